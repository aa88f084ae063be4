"""The learning-rate schedules of ``train.schedule``: linear warm-up, then linear or cosine decay,
or constant.

The multipliers are transformers' (``get_scheduler``'s ``linear``, ``cosine`` and
``constant_with_warmup``), step for step; ``tests/test_schedule.py`` holds them equal. They are
written here because importing ``transformers.get_scheduler`` imports the Trainer's utilities,
which import peft and, where it is installed, bitsandbytes: about 4.5 s of start-up on a 2-core
EPYC (BENCHMARKS.md, "Optimisations made in the code"), paid by every run, LoRA or not.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    """Half a cosine period from 1 down to 0 after the warm-up (transformers' num_cycles=0.5)."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _constant(step: int, *, warmup: int, total: int) -> float:
    del total  # the same signature as the decaying schedules
    return _warmup(step, warmup) if step < warmup else 1.0


RULES = {"linear": _linear, "cosine": _cosine, "constant": _constant}  # train.schedule's values


def scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR scaling every parameter group's rate by the named schedule at each step.

    ``warmup_steps``: optimizer steps of linear warm-up from 0; ``total_steps``: the run's
    optimizer steps (linear and cosine reach 0 there). A partial of a module-level function
    keeps the scheduler's ``state_dict`` free of closures, as transformers' own is.
    """
    if name not in RULES:
        raise ValueError(f"unknown schedule {name!r}; one of {', '.join(RULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(RULES[name], warmup=warmup_steps, total=total_steps))
