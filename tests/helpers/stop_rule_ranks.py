"""Run under torchrun with 2 processes: the ranks see different signals; they must still stop,
and evaluate, at the same steps. Writes each rank's (step, reason, evaluated) to OUT/rank<N>.json."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from ecoadapt.config import BudgetConfig
from ecoadapt.measure.budget import Budget
from ecoadapt.model import parallel
from ecoadapt.train.early_stop import EarlyStop
from ecoadapt.train.stopping import StopRule

out = Path(sys.argv[1])
world, _ = parallel.setup("ddp", "cpu", timeout_s=60)
# Rank 1 is signalled at step 2 (a scheduler reached it first); rank 0 at step 5.
signalled_at = {0: 5, 1: 2}[world.rank]
result = SimpleNamespace(steps=0, tokens=0, time_s=0.0, stopped_by=None)


class Signals:
    def check(self, _result=None):
        return "interrupted" if result.steps >= signalled_at else None


evaluated = []


def evaluate(r):
    evaluated.append(r.steps)
    parallel.broadcast("a collective inside evaluation, as FSDP's forward", world)
    return 1.0


rule = StopRule(world, Signals(), Budget(BudgetConfig(), lambda: 0.0, 10), evaluate, 2, EarlyStop(None))
log = []
for step in range(1, 11):
    result.steps = step
    reason = rule(result)
    log.append([step, reason])
    if reason:
        break
(out / f"rank{world.rank}.json").write_text(json.dumps({"log": log, "evaluated": evaluated}))
parallel.teardown(barrier=True)
