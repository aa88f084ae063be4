"""Run under torchrun with 2 processes: rank 1 fails while rank 0 waits in a collective."""

import sys

from ecoadapt.model import parallel

world, _ = parallel.setup("ddp", "cpu", timeout_s=60)
if world.rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
parallel.broadcast("never answered", world)  # rank 0 blocks here until the job is torn down
sys.exit(0)
