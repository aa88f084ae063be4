"""train.schedule: transformers' learning-rate multipliers, step for step, without its import cost."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import get_scheduler

from ecoadapt.train.schedule import scheduler

HF_NAME = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def rates(sched: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        optimizer.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 12), (3, 17), (5, 5)])
def test_each_schedule_is_transformers_own(name: str, warmup: int, total: int):
    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    ours, theirs = optimizer(), optimizer()
    reference = get_scheduler(HF_NAME[name], theirs, num_warmup_steps=warmup, num_training_steps=total)
    expected = rates(reference, theirs, total + 2)
    got = rates(scheduler(name, ours, warmup, total), ours, total + 2)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] == pytest.approx(0.0 if warmup else 0.1)  # warm-up starts from 0


def test_a_restored_schedule_continues_where_it_stopped():
    param = torch.nn.Parameter(torch.zeros(1))
    first = torch.optim.SGD([param], lr=0.1)
    sched = scheduler("cosine", first, 2, 10)
    rates(sched, first, 4)
    second = torch.optim.SGD([param], lr=0.1)
    restored = scheduler("cosine", second, 2, 10)
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == 4
    assert restored.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_a_checkpoint_of_transformers_schedule_resumes_in_ours():
    """Checkpoints written before this module held transformers' LambdaLR: they still resume."""
    param = torch.nn.Parameter(torch.zeros(1))
    theirs = torch.optim.SGD([param], lr=0.1)
    old = get_scheduler("linear", theirs, num_warmup_steps=2, num_training_steps=10)
    rates(old, theirs, 5)
    ours = scheduler("linear", torch.optim.SGD([param], lr=0.1), 2, 10)
    ours.load_state_dict(old.state_dict())
    assert ours.last_epoch == 5
    assert ours.get_last_lr() == pytest.approx(old.get_last_lr())
    assert ours.get_last_lr()[0] == pytest.approx(0.1 * 5 / 8)


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'step'"):
        scheduler("step", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 0, 5)


def test_training_imports_neither_peft_nor_bitsandbytes():
    """Importing them costs seconds per run; a full fine-tune needs neither."""
    code = "import sys, ecoadapt.commands.adapt, ecoadapt.train.loop, ecoadapt.task.downstream\n"
    code += "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
