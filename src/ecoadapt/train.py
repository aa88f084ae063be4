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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from ecoadapt import parallel
from ecoadapt.config import TrainConfig
from ecoadapt.data.batches import IGNORE, target_count
from ecoadapt.precision import Policy


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """Summed cross-entropy over target tokens, in fp32.

    Args:
        logits: (batch, seq, vocab), or (targets, vocab) already gathered; any float dtype.
        labels: (batch, seq) or (targets,), int64, IGNORE where there is no target.
        objective: "clm" predicts token t+1 from position t; "mlm" predicts each masked token.

    Returns:
        A scalar tensor: the sum (not the mean) of the per-token losses.
    """
    if objective == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.ndim == 2:  # already gathered to target positions
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def encoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """Split a masked-LM model into its encoder and its LM head, when the layout is the usual one.

    Works through a PEFT wrapper (LoRA layers sit inside the same modules). Returns None when
    the model is not ``encoder + one head module`` (the caller then computes full logits).
    """
    if parallel.is_wrapped(model):
        return None  # DDP/FSDP must see the whole forward pass (their gradient hooks hang on it)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    encoder = getattr(inner, "base_model", None)
    if encoder is None or encoder is inner:
        return None
    heads = [m for m in inner.children() if m is not encoder]
    return (encoder, heads[0]) if len(heads) == 1 else None


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    objective: str,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for the loss.

    For masked LM only the masked positions (about 15%) go through the LM head: the head's
    vocabulary projection is about half of a small encoder's FLOPs, and its full
    (batch, seq, vocab) logits the largest tensor of the step. Returns logits (targets, vocab)
    and labels (targets,) then; for classification ("cls") logits (batch, classes) and labels
    (batch,); otherwise logits (batch, seq, vocab) and labels (batch, seq). Packed LM blocks
    have no padding, so only classification batches carry an attention mask.
    """
    if objective == "cls":
        return model(input_ids=input_ids, attention_mask=attention_mask).logits, labels
    if objective == "mlm":
        split = encoder_and_head(model)
        if split is not None:
            encoder, head = split
            hidden = encoder(input_ids=input_ids).last_hidden_state
            keep = labels != IGNORE
            return head(hidden[keep]), labels[keep]
    return model(input_ids=input_ids).logits, labels


def accumulate(
    model: torch.nn.Module,
    micro: list[dict[str, torch.Tensor]],
    objective: str,
    policy: Policy,
    device: torch.device,
    world_size: int = 1,
) -> tuple[torch.Tensor, int, int]:
    """Forward and backward over the micro-batches of one optimizer step.

    Every micro-batch's summed loss is divided by the target tokens of *all* of them (on all
    ranks), so the accumulated gradient is that of the mean loss over the whole step's
    targets. Under data parallelism the loss is also multiplied by the world size, because DDP
    and FSDP average gradients over ranks; gradients are synchronised on the last micro-step
    only.

    Returns:
        (the step's mean loss on this rank's share, as a detached device scalar; input tokens
        on this rank; target tokens of the whole step, all ranks).
    """
    if "global_targets" in micro[0]:
        n_targets = max(1, sum(int(b["global_targets"]) for b in micro))
    else:
        n_targets = max(1, sum(target_count(b["labels"], objective) for b in micro))
    step_loss = torch.zeros((), device=device)
    n_tokens = 0
    for i, batch in enumerate(micro):
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True) if "attention_mask" in batch else None
        with parallel.gradient_sync(model, enabled=i == len(micro) - 1):
            with policy.autocast():
                logits, labels = forward_logits(model, input_ids, labels, objective, mask)
            loss = loss_sum(logits, labels, objective) / n_targets
            policy.backward(loss * world_size if world_size > 1 else loss)
        step_loss += loss.detach()
        # Real tokens only (padding excluded); counted on the host copy: no device sync.
        n_tokens += int(batch["attention_mask"].sum()) if mask is not None else input_ids.numel()
    return step_loss, n_tokens, n_targets


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
        steps: optimizer steps taken (skipped fp16 steps included).
        tokens: input tokens processed (all positions of every block).
        target_tokens: tokens the loss was computed on.
        time_s: wall time of the loop, seconds (no model loading, no evaluation).
        train_loss: mean loss per target token over the last logging window.
        logs: the records written to metrics.jsonl.
        stopped_by: the budget (or early stop) that ended the run before its last step.
        excluded_s: seconds spent in ``should_stop`` on other work (periodic evaluation),
            left out of ``time_s``.
    """

    steps: int = 0
    tokens: int = 0
    target_tokens: int = 0
    time_s: float = 0.0
    train_loss: float = float("nan")
    logs: list[StepLog] = field(default_factory=list)
    stopped_by: str | None = None
    excluded_s: float = 0.0


def run(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    objective: str,
    policy: Policy,
    device: torch.device,
    on_log: Callable[[StepLog], None] | None = None,
    should_stop: Callable[[TrainResult], str | None] | None = None,
    world_size: int = 1,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps.

    Args:
        model: the model, its trainable parameters already chosen (requires_grad).
        batches: endless micro-batches ({"input_ids", "labels"}, each (batch, seq)).
        steps: optimizer steps to take.
        cfg: the train section (lr, schedule, accumulation, clipping).
        objective: "clm", "mlm", or "cls" (sequence classification, the downstream task).
        policy: precision policy (autocast, loss scaling).
        device: where the model lives.
        on_log: called with each StepLog (progress display, metrics.jsonl).
        should_stop: called after every optimizer step; a returned reason (a budget reached,
            an early stop) ends the loop after that step, recorded in ``stopped_by``. Time it
            spends on other work it adds to ``result.excluded_s``. Under data parallelism it
            must return the same on every rank.
        world_size: processes training together (the loss is scaled for gradient averaging).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach kernels batch the per-parameter updates: fewer, larger ops on CPU and GPU.
    groups = policy.optimizer_params(parameter_groups(model, cfg.weight_decay))  # fp32 masters where needed
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    scheduler = get_scheduler(
        cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * steps),
        num_training_steps=steps,
    )
    result = TrainResult()
    window_loss = torch.zeros((), device=device)
    window_steps = 0
    window_tokens = 0
    model.train()
    start = window_start = time.perf_counter()
    window_excluded = 0.0
    for step in range(1, steps + 1):
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        step_loss, n_tokens, n_targets = accumulate(model, micro, objective, policy, device, world_size)
        result.tokens += n_tokens
        window_tokens += n_tokens
        result.target_tokens += n_targets
        policy.step(optimizer, params, cfg.max_grad_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += step_loss
        window_steps += 1
        result.steps = step
        result.time_s = time.perf_counter() - start - result.excluded_s
        if should_stop is not None:
            result.stopped_by = should_stop(result)

        if step % cfg.log_every == 0 or step == steps or result.stopped_by:
            if world_size > 1:  # each rank holds its share of the global mean: add them up
                torch.distributed.all_reduce(window_loss)
            # .item() is a device-host sync: paid once per logging window, not per step.
            loss_value = window_loss.item() / window_steps
            now = time.perf_counter()
            record = StepLog(
                step=step,
                loss=loss_value,
                lr=scheduler.get_last_lr()[0],
                tokens=result.tokens,
                elapsed_s=now - start,
                tokens_per_s=window_tokens / max(now - window_start - (result.excluded_s - window_excluded), 1e-9),
            )
            result.logs.append(record)
            result.train_loss = loss_value
            if on_log is not None:
                on_log(record)
            window_loss.zero_()
            window_steps = window_tokens = 0
            window_start = now
            window_excluded = result.excluded_s
        if result.stopped_by:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()  # time what the GPU did, not what was queued
    result.time_s = time.perf_counter() - start - result.excluded_s
    return result
