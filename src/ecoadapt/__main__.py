"""`python -m ecoadapt` (what torchrun runs) is the `ecoadapt` command."""

import sys

from ecoadapt.cli import main

sys.exit(main())
