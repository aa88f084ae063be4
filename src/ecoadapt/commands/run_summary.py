"""The adapt run's summary, filled from what its steps left (training, the evaluations, the
save and the measurements): one place that maps a run's state onto ``summary.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ecoadapt.commands import finish
from ecoadapt.data.batches import BlockLoader
from ecoadapt.measure import environment
from ecoadapt.measure.budget import BUDGETS, Budget
from ecoadapt.results import rundir
from ecoadapt.results.summary import (
    EvalSummary,
    GeneralSummary,
    ModelSummary,
    ParallelSummary,
    ReliabilitySummary,
    RunSummary,
)
from ecoadapt.task import stats
from ecoadapt.train import checkpoint, micro_batch
from ecoadapt.train.early_stop import EarlyStop, TargetLoss
from ecoadapt.train.heldout import HeldOut
from ecoadapt.train.interrupt import Interrupts
from ecoadapt.train.loop import TrainResult


class RunState(Protocol):
    """What the summary is filled from: the state an adapt run's steps leave (AdaptRun's)."""

    cfg: Any
    p: Any
    world: Any
    device: torch.device
    summary: Any
    batch_choice: Any
    eval_blocks: Any
    precision_choice: dict[str, Any] | None
    run_dir: Path

    def log(self, message: str) -> None:
        """A line of narration, from rank 0 only."""


@dataclass
class Measured:
    """What the measure step leaves, for the whole job (every rank summed or gathered)."""

    memory: dict[str, Any] | None
    """Peak memory per window (summary.json's ``memory``)."""
    energy: dict[str, Any] | None
    """Joules per window, with the method and meter (summary.json's ``energy``; None: off)."""
    flops: dict[str, Any]
    """FLOPs per token, the device's peak and MFU (summary.json's ``flops``)."""
    tokens_per_s: float
    """Training tokens per second, all ranks."""


@dataclass
class Training:
    """What the train step leaves: the loop's result and what produced it."""

    result: TrainResult
    loader: BlockLoader
    budget: Budget
    stopper: EarlyStop
    interrupts: Interrupts
    checkpoints: checkpoint.RunCheckpoints | None
    head_first: dict[str, Any] | None = None
    target: TargetLoss | None = None


def fill(
    run: RunState,
    training: Training,
    before: HeldOut,
    after: HeldOut,
    saved: list[str],
    measured: Measured,
) -> None:
    """Fill ``run.summary`` with everything but the task (see :mod:`ecoadapt.commands.finish`)."""
    cfg, p, world, s = run.cfg, run.p, run.world, run.summary
    result = training.result
    p.phases["train_s"] = result.time_s
    p.phases["eval_s"] = before.time_s + after.time_s
    s.status = "stopped_by_budget" if result.stopped_by in BUDGETS else "completed"
    s.stopped_by = result.stopped_by
    s.budget = training.budget.summary(result)
    s.early_stop = training.stopper.summary()
    s.target = training.target.summary(result.steps) if training.target is not None else None
    s.objective = p.loaded.objective
    plan = p.recipe.plan
    s.model = ModelSummary(
        p.loaded.source, p.recipe.counts, plan.blocks, plan.n_blocks, plan.lora, p.loaded.fresh, saved
    )
    s.data = p.blocks.stats
    s.steps, s.epochs = result.steps, training.loader.epochs_done
    s.tokens = result.tokens * world.size  # every rank processes the same number of tokens
    s.target_tokens, s.time_s = result.target_tokens, result.time_s
    s.tokens_per_s, s.train_loss = measured.tokens_per_s, result.train_loss
    s.reliability = ReliabilitySummary(
        result.nonfinite_steps,
        result.rollbacks,
        result.lr_scale,
        result.memory_events,
        -(-cfg.train.micro_batch_size // result.micro_batch_splits),
        cfg.train.grad_accum * result.micro_batch_splits,
    )
    s.batch = micro_batch.summary(cfg, run.batch_choice, result.micro_batch_splits)
    s.eval = EvalSummary(
        before.loss, after.loss, before.perplexity, after.perplexity,
        before.accuracy, after.accuracy, after.target_tokens, len(run.eval_blocks),
        general_summary(before, after, p.general.stats if p.general is not None else None),
    )  # fmt: skip
    s.precision = {**p.recipe.policy.summary(), **p.recipe.precision_report, "auto": run.precision_choice}
    s.energy = finish.energy_summary(measured.energy, {}, s.tokens, before.loss - after.loss)
    s.memory, s.flops = measured.memory, measured.flops
    s.mfu = measured.flops["mfu"]
    s.head_first = training.head_first
    s.notes = finish.notes(cfg, p)
    s.compile = p.recipe.compiled.report()
    s.parallel = ParallelSummary(world.size, world.strategy)
    s.phases_s = p.phases
    s.environment = environment.describe(run.device)


def general_summary(before: HeldOut, after: HeldOut, general: dict[str, Any] | None) -> GeneralSummary | None:
    """The general text's change (after minus before), its interval paired batch by batch, and
    the verdict; None when the run measured none.

    Args:
        general: the general text's statistics (sources, blocks).
    """
    b, a = before.general, after.general
    if b is None or a is None or general is None:
        return None
    change = a.loss - b.loss
    paired = b.batch_size == a.batch_size and len(b.batch_losses) == len(a.batch_losses)
    diffs = [y - x for x, y in zip(b.batch_losses, a.batch_losses, strict=True)] if paired else []
    spread = stats.mean_interval(diffs, "batch") if diffs else None
    # Centred on the exact change (batches of masked LM hold different numbers of targets, so
    # the mean of the batches' changes can differ from it in the fourth decimal), the width the
    # batches' paired changes give.
    half = spread.high - spread.mean if spread is not None and spread.high is not None else None
    interval = stats.Interval(
        change, change - half if half is not None else None, change + half if half is not None else None,
        len(diffs), "batch",
    )  # fmt: skip
    verdict = stats.loss_change_verdict(interval)
    return GeneralSummary(
        general["sources"], general["blocks"], a.target_tokens, b.loss, a.loss, change,
        interval.low, interval.high, interval.n, verdict.word, verdict.text,
    )  # fmt: skip


def interrupted(run: RunState, training: Training) -> RunSummary:
    """A signal stopped training: the checkpoint is written; say so, and how to go on."""
    result, checkpoints, name = training.result, training.checkpoints, training.interrupts.name
    kept = checkpoints is not None and checkpoints.saved_at == result.steps
    s = run.summary
    s.status, s.signal, s.steps = "interrupted", name, result.steps
    s.checkpoint = rundir.CHECKPOINT_FILE if kept else None
    if run.world.is_main:
        s.save(run.run_dir / "summary.json")
    how = "checkpoint saved, rerun the same command to resume" if kept else "no checkpoint (FSDP): rerun to restart"
    run.log(f"{name}: stopped after step {result.steps}; {how}")
    return s


def interrupted_after_training(run: RunState, signal_name: str) -> RunSummary:
    """A signal arrived after training: everything up to the task is done and recorded."""
    s = run.summary
    s.status, s.signal = "interrupted", signal_name
    s.save(run.run_dir / "summary.json")
    run.log(f"{signal_name}: stopped after training (the model is saved); rerun the same command to run the task")
    return s
