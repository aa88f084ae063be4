"""`python -m ecoadapt` (what torchrun runs) is the `ecoadapt` command."""

import sys

from ecoadapt.cli import main

if __name__ == "__main__":  # spawned worker processes (tokenization) import this module too
    sys.exit(main())
