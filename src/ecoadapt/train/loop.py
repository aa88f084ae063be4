"""THE training loop: one readable loop, top to bottom.

Each optimizer step draws ``grad_accum`` micro-batches, counts their target tokens first, and
divides every micro-batch's summed loss by that total. The accumulated gradient is then exactly
the gradient of the mean loss over all target tokens of the step, however unevenly the tokens
fall across micro-batches (averaging per micro-batch, as the Hugging Face Trainer long did,
over-weights micro-batches with few targets).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ecoadapt.config import TrainConfig
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.data.batches import target_count
from ecoadapt.measure import memory
from ecoadapt.model import parallel
from ecoadapt.model.losses import as_loss_module
from ecoadapt.model.precision import Policy
from ecoadapt.train.micro_batch import is_out_of_memory, split_micro_batches
from ecoadapt.train.param_groups import adamw, parameter_groups
from ecoadapt.train.schedule import scheduler as lr_schedule


class MemoryLimitExceeded(torch.OutOfMemoryError):
    """The process's resident memory passed train.max_memory_gb (the CPU's out of memory)."""


def accumulate(
    model: torch.nn.Module,
    micro: list[dict[str, torch.Tensor]],
    objective: str,
    policy: Policy,
    device: torch.device,
    world_size: int = 1,
    memory_limit_bytes: int | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Forward and backward over the micro-batches of one optimizer step.

    ``model`` is called as a :class:`~ecoadapt.model.losses.LossModule` (one is put around a plain
    model): under DDP and FSDP the wrapper's hooks then see the whole loss computation.

    Every micro-batch's summed loss is divided by the target tokens of *all* of them (on all
    ranks), so the accumulated gradient is that of the mean loss over the whole step's
    targets. Under data parallelism the loss is also multiplied by the world size, because DDP
    and FSDP average gradients over ranks; gradients are synchronised on the last micro-step
    only.

    Args:
        memory_limit_bytes: raise :class:`MemoryLimitExceeded` when the process's resident
            memory is above this after a forward pass (activations are then at their largest).

    Returns:
        (the step's mean loss on this rank's share, as a detached device scalar; input tokens
        on this rank; target tokens of the whole step, all ranks).
    """
    if "global_targets" in micro[0]:
        n_targets = max(1, sum(int(b["global_targets"]) for b in micro))
    else:
        n_targets = max(1, sum(target_count(b["labels"], objective) for b in micro))
    module = as_loss_module(model, objective)
    step_loss = torch.zeros((), device=device)
    n_tokens = 0
    for i, batch in enumerate(micro):
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True) if "attention_mask" in batch else None
        with parallel.gradient_sync(module, enabled=i == len(micro) - 1):
            with policy.autocast():
                loss = module(input_ids, labels, mask) / n_targets
            if memory_limit_bytes is not None and (used := memory.rss_bytes()) > memory_limit_bytes:
                raise MemoryLimitExceeded(
                    f"resident memory {used / 2**30:.2f} GiB > train.max_memory_gb {memory_limit_bytes / 2**30:g}"
                )
            policy.backward(loss * world_size if world_size > 1 else loss)
        step_loss += loss.detach()
        # Real tokens only (padding excluded); counted on the host copy: no device sync.
        n_tokens += int(batch["attention_mask"].sum()) if mask is not None else input_ids.numel()
    return step_loss, n_tokens, n_targets


def total_steps(cfg: TrainConfig, n_blocks: int) -> int:
    """Optimizer steps for the run: train.max_steps, or train.epochs over ``n_blocks``."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    assert cfg.epochs is not None
    return max(1, math.ceil(cfg.epochs * n_blocks / (cfg.micro_batch_size * cfg.grad_accum)))


@dataclass
class StepLog:
    """One metrics.jsonl record (logged every train.log_every steps)."""

    step: int
    loss: float
    lr: float
    tokens: int
    elapsed_s: float
    tokens_per_s: float


@dataclass
class TrainResult:
    """What the loop did.

    Attributes:
        steps: optimizer steps taken (skipped steps included).
        tokens: input tokens processed (all positions of every block).
        target_tokens: tokens the loss was computed on.
        time_s: wall time of the loop, seconds (no model loading, no evaluation); a resumed
            run adds the time of the runs before it.
        train_loss: mean loss per target token over the last logging window.
        logs: the records written to metrics.jsonl.
        stopped_by: the budget (or early stop, or "interrupted") that ended the run before its
            last step.
        excluded_s: seconds spent in ``should_stop`` on other work (periodic evaluation),
            left out of ``time_s``.
        nonfinite_steps: steps skipped because the loss or gradients were NaN or inf.
        rollbacks: returns to the last checkpoint after train.nonfinite_patience such steps.
        lr_scale: the learning-rate multiplier after rollbacks (1.0 without).
        micro_batch_splits: each drawn micro-batch runs as this many smaller ones (raised by
            train.auto_micro_batch after an out-of-memory error).
        memory_events: each out-of-memory retry: step, error, micro-batch before and after.
    """

    steps: int = 0
    tokens: int = 0
    target_tokens: int = 0
    time_s: float = 0.0
    train_loss: float = float("nan")
    logs: list[StepLog] = field(default_factory=list)
    stopped_by: str | None = None
    excluded_s: float = 0.0
    nonfinite_steps: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    micro_batch_splits: int = 1
    memory_events: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        """The counters a checkpoint keeps (plain values)."""
        out = {k: v for k, v in self.__dict__.items() if k != "logs"}
        out["logs"] = [log.__dict__ for log in self.logs]
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Take the counters of :meth:`state` back, in place (the loop holds this object).

        What stopped the attempt that wrote them is not taken: a checkpoint written on a signal
        at the last step would otherwise end every rerun "interrupted" again, with no step left
        to clear it.
        """
        self.__dict__.update({**state, "logs": [StepLog(**log) for log in state["logs"]], "stopped_by": None})


class Checkpoints(Protocol):
    """What the loop asks of the run's checkpoints (see :mod:`ecoadapt.train.checkpoint`)."""

    def save(self, loop: Loop) -> None:
        """Write a resumable checkpoint of ``loop`` at its current step."""

    def rollback(self, loop: Loop) -> bool:
        """Put ``loop`` back at the last checkpoint; False when there is none."""


@dataclass
class Hooks:
    """How the run around the loop takes part in it.

    Attributes:
        on_log: called with each StepLog (progress display, metrics.jsonl).
        should_stop: called after every optimizer step; a returned reason (a budget reached,
            an early stop, "interrupted") ends the loop after that step, recorded in
            ``stopped_by``. Time it spends on other work it adds to ``result.excluded_s``.
            Under data parallelism it must return the same on every rank.
        checkpoints: where train.save_every checkpoints go, and where a run of non-finite
            steps rolls back to; an interrupted loop checkpoints before it returns.
        after_step: called after every optimizer step, before should_stop (the in-run forecast
            watches the first steps with it); it must be cheap.
        before_step: called before every optimizer step (train.micro_batch_size: auto sets
            ``result.micro_batch_splits`` with it); it must be cheap.
    """

    on_log: Callable[[StepLog], None] | None = None
    should_stop: Callable[[TrainResult], str | None] | None = None
    checkpoints: Checkpoints | None = None
    after_step: Callable[[TrainResult], None] | None = None
    before_step: Callable[[TrainResult], None] | None = None


@dataclass
class Loop:
    """The training loop's state (what a checkpoint saves and a resume restores) and settings.

    Attributes:
        model: the model (possibly DDP/FSDP-wrapped).
        params: its trainable parameters.
        optimizer: AdamW over them (or over their fp32 masters).
        scheduler: the learning-rate schedule.
        policy: the precision policy.
        steps: optimizer steps to reach.
        cfg: the train section (accumulation, clipping, checkpoints, guards).
        objective: "clm", "mlm", or "cls" (sequence classification, the downstream task).
        device: where the model lives.
        world_size: processes training together (the loss is scaled for gradient averaging).
        result: what the loop has done so far.
    """

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    policy: Policy
    steps: int
    cfg: TrainConfig
    objective: str
    device: torch.device
    world_size: int = 1
    result: TrainResult = field(default_factory=TrainResult)

    @classmethod
    def create(
        cls,
        model: torch.nn.Module,
        steps: int,
        cfg: TrainConfig,
        policy: Policy,
        objective: str,
        device: torch.device,
        world_size: int = 1,
        new: Collection[str] = (),
    ) -> Loop:
        """AdamW over the trainable parameters (fp32 masters where needed), warm-up and decay.

        A plain model is put inside a :class:`~ecoadapt.model.losses.LossModule` (``loop.model``).
        ``new``: newly initialised parameters, which keep train.lr when train.body_lr_scale
        lowers the rest.
        """
        model = as_loss_module(model, objective)
        parallel.reshard(model)  # the optimizer must hold FSDP's sharded parameters, not a forward's copies
        params = [p for p in model.parameters() if p.requires_grad]
        groups = policy.optimizer_params(parameter_groups(model, cfg.weight_decay, cfg.lr, new, cfg.body_lr_scale))
        optimizer = adamw(groups, cfg.lr, cfg.optimizer)
        scheduler = lr_schedule(cfg.schedule, optimizer, int(cfg.warmup_ratio * steps), steps)
        return cls(model, params, optimizer, scheduler, policy, steps, cfg, objective, device, world_size)

    def scale_lr(self, factor: float) -> None:
        """Multiply the schedule's learning rates (base and current) by ``factor``."""
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        self.result.lr_scale *= factor

    def drop_gradients(self) -> None:
        """Forget a failed step's partial gradients."""
        for p in self.params:
            p.grad = None
        for _, master in self.policy.masters:
            master.grad = None


def each(*hooks: Callable[[TrainResult], None]) -> Callable[[TrainResult], None] | None:
    """One per-step hook that calls ``hooks`` in order (None when there are none)."""
    if not hooks:
        return None

    def call_each(result: TrainResult) -> None:
        for hook in hooks:
            hook(result)

    return call_each


def fit_model(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    objective: str,
    policy: Policy,
    device: torch.device,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps from scratch, single process, no hooks."""
    return fit(Loop.create(model, steps, cfg, policy, objective, device), batches)


class _Window:
    """The loss and tokens of one logging window (train.log_every steps), and its clock."""

    def __init__(self, device: torch.device, excluded_s: float) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = self.tokens = 0
        self.start = time.perf_counter()
        self.excluded_s = excluded_s

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss  # stays on the device: no sync per step
        self.steps += 1
        self.tokens += tokens

    def close(self, loop: Loop, elapsed_s: float) -> StepLog:
        """The window's record; the window starts again."""
        result = loop.result
        if loop.world_size > 1:  # each rank holds its share of the global mean: add them up
            torch.distributed.all_reduce(self.loss)
        # .item() is a device-host sync: paid once per logging window, not per step.
        loss = self.loss.item() / self.steps if self.steps else float("nan")
        now = time.perf_counter()
        seconds = now - self.start - (result.excluded_s - self.excluded_s)
        record = StepLog(
            step=result.steps,
            loss=loss,
            lr=loop.scheduler.get_last_lr()[0],
            tokens=result.tokens,
            elapsed_s=elapsed_s,
            tokens_per_s=self.tokens / max(seconds, 1e-9),
        )
        self.__init__(self.loss.device, result.excluded_s)  # type: ignore[misc]
        return record


def fit(loop: Loop, batches: Iterator[dict[str, torch.Tensor]], hooks: Hooks | None = None) -> TrainResult:
    """Train until ``loop.steps`` optimizer steps are done, from wherever ``loop`` is.

    Args:
        loop: the model, optimizer, scheduler and settings, fresh or restored from a checkpoint.
        batches: endless micro-batches ({"input_ids", "labels"}, each (batch, seq)).
        hooks: logging, stopping and checkpoints (see :class:`Hooks`).

    Raises:
        UserError: the loss stayed non-finite, no rollback left; out of memory, nothing to shrink.
    """
    hooks = hooks or Hooks()
    result, cfg = loop.result, loop.cfg
    loop.model.train()
    window = _Window(loop.device, result.excluded_s)
    start, time_before, excluded_before = time.perf_counter(), result.time_s, result.excluded_s
    in_a_row = 0  # non-finite steps in a row

    def clock() -> float:  # a resumed run continues its clock; excluded work is not training
        return time_before + time.perf_counter() - start - (result.excluded_s - excluded_before)

    while result.steps < loop.steps:
        if hooks.before_step is not None:
            hooks.before_step(result)
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        step_loss, n_tokens, n_targets = _fit_step(loop, micro)
        status = apply_step(loop, step_loss)
        result.steps += 1
        result.tokens += n_tokens
        result.target_tokens += n_targets
        if status == "nonfinite":
            result.nonfinite_steps += 1
            in_a_row += 1
            if in_a_row >= cfg.nonfinite_patience:
                _roll_back(loop, hooks.checkpoints, result.steps)
                in_a_row = 0
                window = _Window(loop.device, result.excluded_s)
                continue
        else:
            in_a_row = 0
            window.add(step_loss, n_tokens)
        result.time_s = clock()
        if hooks.after_step is not None:
            hooks.after_step(result)
        if hooks.should_stop is not None:
            result.stopped_by = hooks.should_stop(result)
        if result.steps % cfg.log_every == 0 or result.steps == loop.steps or result.stopped_by:
            record = window.close(loop, clock())
            result.logs.append(record)
            result.train_loss = record.loss
            if hooks.on_log is not None:
                hooks.on_log(record)
        # After the step's log line: a kill right after the checkpoint loses no record.
        _checkpoint_if_due(loop, hooks, healthy=in_a_row == 0)
        if result.stopped_by:
            break
    if loop.device.type == "cuda":
        torch.cuda.synchronize()  # time what the GPU did, not what was queued
    result.time_s = clock()
    return result


def _checkpoint_if_due(loop: Loop, hooks: Hooks, healthy: bool) -> None:
    """Save a checkpoint every ``train.save_every`` steps (not amid non-finite steps) and on a signal."""
    result, every = loop.result, loop.cfg.save_every
    periodic = every is not None and result.steps % every == 0 and healthy
    if hooks.checkpoints is not None and (periodic or result.stopped_by == "interrupted"):
        t0 = time.perf_counter()
        hooks.checkpoints.save(loop)
        result.excluded_s += time.perf_counter() - t0  # writing files is not training


def apply_step(loop: Loop, step_loss: torch.Tensor) -> str:
    """The optimizer step (see :meth:`Policy.step`), the schedule, and fresh gradients."""
    try:
        status = loop.policy.step(
            loop.optimizer, loop.params, loop.cfg.max_grad_norm, step_loss if loop.world_size == 1 else None
        )
    except torch.OutOfMemoryError as e:
        # Adam allocates its two moments at the first step: that memory does not shrink with
        # the micro-batch, so splitting it would not help.
        loop.drop_gradients()
        raise UserError(
            f"train: out of memory in the optimizer step ({str(e).splitlines()[0][:200]}); the optimizer state "
            "needs 8 bytes per trainable parameter: use LoRA, train.trainable_layers, or a smaller model"
        ) from None
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return status


def _fit_step(loop: Loop, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int, int]:
    """One step's forward and backward; on out of memory, with train.auto_micro_batch, the same
    rows again in micro-batches half as large (twice as many), until they fit."""
    result, cfg = loop.result, loop.cfg
    # The CPU guard reads the resident set; on CUDA the allocator itself enforces the cap.
    on_cpu = loop.device.type == "cpu"
    memory_limit = int(cfg.max_memory_gb * 2**30) if cfg.max_memory_gb is not None and on_cpu else None
    while True:
        parts = split_micro_batches(micro, result.micro_batch_splits) if result.micro_batch_splits > 1 else micro
        failure: str | None = None
        try:
            return accumulate(
                loop.model, parts, loop.objective, loop.policy, loop.device, loop.world_size, memory_limit
            )
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            what = "the memory guard" if isinstance(e, MemoryLimitExceeded) else "out of memory"
            failure = f"{what}|{str(e).splitlines()[0][:200]}"
        # Outside the except block: its traceback held the failed step's frames and tensors,
        # so emptying the cache in there freed nothing.
        loop.drop_gradients()
        if loop.device.type == "cuda":
            torch.cuda.empty_cache()
        memory.reset_peak(loop.device)  # the failed attempt's high-water mark is not the recipe's peak
        what, message = failure.split("|", 1)
        _shrink_micro_batches(loop, micro, parts[0]["input_ids"].shape[0], what, message)


def _shrink_micro_batches(loop: Loop, micro: list[dict[str, torch.Tensor]], size: int, what: str, message: str) -> None:
    """Twice as many micro-batches, half as large, after out of memory; or a clear stop."""
    result = loop.result
    if not (loop.cfg.auto_micro_batch or loop.cfg.fill_micro_batch) or size <= 1 or loop.world_size > 1:
        hint = (
            "it does not fit even one block per micro-batch: shorten data.max_seq_len, use LoRA or bf16-pure"
            if size <= 1
            else "set train.auto_micro_batch=true (single process), or lower train.micro_batch_size"
        )
        raise UserError(
            f"train.micro_batch_size: {what} at step {result.steps + 1} with {size} blocks per micro-batch "
            f"({message}); {hint}"
        )
    result.micro_batch_splits *= 2
    smaller = split_micro_batches(micro, result.micro_batch_splits)[0]["input_ids"].shape[0]
    result.memory_events.append(
        {"step": result.steps + 1, "error": what, "micro_batch_before": size, "micro_batch_after": smaller}
    )
    say(
        f"{what} at step {result.steps + 1}: micro-batch {size} -> {smaller} blocks, "
        f"{result.micro_batch_splits}x the accumulation (the same effective batch); retrying"
    )


def _roll_back(loop: Loop, checkpoints: Checkpoints | None, step: int) -> None:
    """After train.nonfinite_patience non-finite steps in a row: back to the last checkpoint
    with a lower learning rate, or a clear stop."""
    result, cfg = loop.result, loop.cfg
    reason = f"loss or gradients not finite for {cfg.nonfinite_patience} steps in a row (at step {step})"
    if checkpoints is None or result.rollbacks >= cfg.max_rollbacks:
        why = "no rollback left" if checkpoints is not None else "no checkpoint to roll back to"
        raise UserError(f"train.lr: {reason}, {why}; lower train.lr, or use bf16 rather than fp16")
    rollbacks, nonfinite = result.rollbacks, result.nonfinite_steps
    if not checkpoints.rollback(loop):
        raise UserError(
            f"train.save_every: {reason} and no checkpoint written yet to roll back to; "
            "set train.save_every, lower train.lr, or use bf16 rather than fp16"
        )
    # The restored counters are the checkpoint's; the rollback and what caused it are history.
    result.rollbacks = rollbacks + 1
    result.nonfinite_steps = nonfinite
    loop.scale_lr(cfg.rollback_lr_factor)
    say(f"{reason}: rolled back to step {result.steps}, learning rate x{result.lr_scale:g}")
