"""train.micro_batch_size: auto. Each process draws its whole step as one batch; this module
chooses how many micro-batches it is split into (``TrainResult.micro_batch_splits``), which
changes how the step is computed, never which rows it holds.

- On a GPU the largest micro-batch that fits: the memory the step will still allocate
  (gradients, optimizer state, activations per row from :mod:`ecoadapt.model.footprint`)
  against the device's free memory (or train.max_memory_gb), with headroom. The first step
  checks the estimate: out of memory halves the micro-batch again (the loop's own retry).
- On a CPU, where throughput peaks at moderate sizes (caches: MiniLM took 0.051 s per row
  from 4 to 8 rows and 0.076 from 8 to 16), the size the run's own first steps measure
  fastest: after one warm-up step, one step at each candidate; those steps are training steps
  like any other (the same rows, the same update up to rounding; a model with dropout draws
  its masks per micro-batch, so those differ, as between any two micro-batch sizes), so the
  search costs nothing but the time the slower candidates took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ecoadapt.config.precision_modes import MODES
from ecoadapt.model import footprint

# Blocks per micro-batch tried on a CPU (each capped by the step's blocks).
CPU_CANDIDATES = (4, 8, 16, 32)
# Where the CPU search is not run (too few steps, compiled blocks, several processes).
CPU_DEFAULT = 8
# Share of the free memory a GPU micro-batch plans to use: the estimate errs high, but the
# allocator fragments and kernels take workspaces.
GPU_HEADROOM = 0.85


def splits_for(blocks: int, size: int) -> int:
    """The fewest power-of-two splits of ``blocks`` rows whose parts hold at most ``size`` rows."""
    splits = 1
    while math.ceil(blocks / splits) > max(1, size) and splits < blocks:
        splits *= 2
    return splits


def part_size(blocks: int, splits: int) -> int:
    """Rows of the largest part when ``blocks`` rows are split ``splits`` ways."""
    return math.ceil(blocks / min(splits, blocks))


def fitting_splits(blocks: int, free_bytes: int, still_to_allocate: int, bytes_per_row: int) -> tuple[int, str]:
    """Splits of a GPU step whose micro-batch fits ``free_bytes`` with headroom.

    Args:
        blocks: rows per process and step.
        free_bytes: memory the process may still take on the device.
        still_to_allocate: gradients and optimizer state, allocated at the first step.
        bytes_per_row: activations one row keeps (model.footprint).

    Returns:
        (splits, the reason in words).
    """
    room = GPU_HEADROOM * free_bytes - still_to_allocate
    rows = int(room // max(1, bytes_per_row)) if room > 0 else 0
    splits = splits_for(blocks, max(1, rows))
    gib = 2**30
    how = (
        f"the largest that fits: {free_bytes / gib:.1f} GiB free, {still_to_allocate / gib:.2f} GiB for gradients "
        f"and optimizer state, about {bytes_per_row / 2**20:.0f} MiB of activations per block (estimated from "
        f"the shapes), {GPU_HEADROOM:.0%} of it planned"
    )
    if rows < 1:
        how += "; not even one block is expected to fit: trying 1, the first step tells"
    return splits, how


@dataclass
class MicroBatchChoice:
    """The micro-batch of a filled step: chosen once, before or during the first steps.

    Attributes:
        blocks: rows per process and optimizer step.
        splits: micro-batches per step (the loop may double it after out of memory).
        how: why this size, in words.
        candidates: splits still to measure on a CPU, in order (empty: nothing to measure).
        measured: blocks per micro-batch -> tokens/s of the step measured at it.
    """

    blocks: int
    splits: int
    how: str
    candidates: list[int] = field(default_factory=list)
    measured: dict[int, float] = field(default_factory=dict)
    _started: bool = False
    _last: tuple[float, int] | None = None  # (training seconds, tokens) after the last step

    @classmethod
    def on_cpu(cls, blocks: int, steps_left: int, compiled: bool, processes: int) -> MicroBatchChoice:
        """The CPU search over :data:`CPU_CANDIDATES`, or the default where it cannot run."""
        options = sorted({splits_for(blocks, size) for size in CPU_CANDIDATES}, reverse=True)
        default = splits_for(blocks, CPU_DEFAULT)
        if len(options) < 2:
            return cls(blocks, options[0], f"{part_size(blocks, options[0])} blocks: the step holds no more")
        why_not = (
            "compiled blocks would compile once per size" if compiled
            else "several processes must split alike" if processes > 1
            else f"{steps_left} steps are too few to measure {len(options)} sizes" if steps_left < len(options) + 3
            else None
        )  # fmt: skip
        if why_not is not None:
            return cls(blocks, default, f"{part_size(blocks, default)} blocks, the CPU default ({why_not})")
        # The warm-up step (allocation, first-call costs) runs at the middle size, unmeasured.
        return cls(blocks, options[len(options) // 2], "", candidates=options)

    def before_step(self, result: Any) -> None:
        """Set the split of the coming step: the choice at the first step, then each candidate
        while the search runs. A resumed run keeps its checkpoint's split."""
        if not self._started:
            self._started = True
            if result.steps > 0:
                self.candidates = []
                self.splits = result.micro_batch_splits
                self.how = self.how or f"{part_size(self.blocks, self.splits)} blocks, as before the run was resumed"
                return
            result.micro_batch_splits = max(result.micro_batch_splits, self.splits)
        elif self.candidates:
            result.micro_batch_splits = self.candidates[0]

    def after_step(self, result: Any) -> None:
        """Time the step just taken; after the last candidate, keep the fastest."""
        if not self.candidates:
            return
        now = (result.time_s, result.tokens)
        if self._last is not None:  # a candidate's step (the first step only warmed up)
            seconds, tokens = now[0] - self._last[0], now[1] - self._last[1]
            self.measured[part_size(self.blocks, result.micro_batch_splits)] = tokens / max(seconds, 1e-9)
            tried = self.candidates.pop(0)
            if result.micro_batch_splits > tried:  # out of memory raised it: fewer splits would not fit either
                self.candidates = [c for c in self.candidates if c >= result.micro_batch_splits]
        self._last = now
        if not self.candidates:
            best = max(self.measured, key=lambda size: self.measured[size])
            self.splits = splits_for(self.blocks, best)
            rates = ", ".join(f"{size}: {rate:,.0f}" for size, rate in sorted(self.measured.items()))
            self.how = f"{best} blocks, measured fastest in the first steps (tokens/s by micro-batch: {rates})"
            result.micro_batch_splits = self.splits

    def summary(self, seq_len: int, splits_used: int) -> dict[str, Any]:
        """What summary.json says of the batch."""
        return {
            "blocks_per_step": self.blocks,
            "tokens_per_step": self.blocks * seq_len,
            "micro_batch_size": part_size(self.blocks, splits_used),
            "micro_batches": min(splits_used, self.blocks),
            "how": self.how or "the search did not finish (the run ended first)",
            "measured_tokens_per_s": {str(k): v for k, v in self.measured.items()} or None,
        }


def cuda_free_bytes(device: torch.device, cap_gib: float | None) -> int:
    """Memory this process may still allocate on ``device``: the device's free memory plus what
    the caching allocator holds unused, or what train.max_memory_gb leaves."""
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = free + unused
    if cap_gib is not None:
        available = min(available, int(cap_gib * 2**30) - torch.cuda.memory_allocated(device))
    return max(0, available)


def choose(
    cfg: Any, model: torch.nn.Module, policy: Any, device: torch.device, steps_left: int, compiled: bool, processes: int
) -> MicroBatchChoice | None:
    """The micro-batch choice of a run with train.fill_micro_batch (None without it).

    Args:
        cfg: the run's configuration (train, data sections).
        model: the model as it will train (unwrapped), its weights already on ``device``.
        policy: its precision policy (masters, 16-bit compute).
        steps_left: optimizer steps the loop will take.
        compiled: whether the transformer blocks are compiled (shapes fixed per size).
        processes: ranks training together.
    """
    if not cfg.train.fill_micro_batch:
        return None
    blocks = cfg.train.micro_batch_size
    if device.type != "cuda":
        return MicroBatchChoice.on_cpu(blocks, steps_left, compiled, processes)
    parts = footprint.static_bytes(model, policy, cfg.train.optimizer)
    mode = MODES[policy.mode]
    per_row = footprint.activation_bytes_per_row(
        getattr(model, "config", None), cfg.data.max_seq_len, 2 if mode.sixteen_bit else 4,
        cfg.train.gradient_checkpointing, residual_bytes=4 if mode.autocast else None,
    )  # fmt: skip
    free = cuda_free_bytes(device, cfg.train.max_memory_gb)
    splits, how = fitting_splits(blocks, free, parts["gradients"] + parts["optimizer"], per_row)
    return MicroBatchChoice(blocks, splits, f"{part_size(blocks, splits)} blocks, {how}")


def eval_rows(cfg: Any, device: torch.device) -> int:
    """Blocks per held-out batch: the micro-batch, or on a CPU with a filled step (whose drawn
    batch is the whole step) the CPU default, which evaluates as fast with less memory."""
    rows = int(cfg.train.micro_batch_size)
    return min(rows, CPU_DEFAULT) if cfg.train.fill_micro_batch and device.type != "cuda" else rows


def summary(cfg: Any, choice: MicroBatchChoice | None, splits_used: int) -> dict[str, Any]:
    """summary.json's ``batch``: tokens per step, the micro-batch that ran and why."""
    seq, t = cfg.data.max_seq_len, cfg.train
    if choice is not None:
        out = choice.summary(seq, splits_used)
    else:
        blocks = t.micro_batch_size * t.grad_accum
        out = {
            "blocks_per_step": blocks,
            "tokens_per_step": blocks * seq,
            "micro_batch_size": part_size(t.micro_batch_size, splits_used),
            "micro_batches": t.grad_accum * min(splits_used, t.micro_batch_size),
            "how": "train.micro_batch_size" + (" (halved after out of memory)" if splits_used > 1 else ""),
            "measured_tokens_per_s": None,
        }
    out["tokens_per_step"] *= cfg.parallel.nproc  # all processes
    return out


def split_micro_batches(micro: list[dict[str, torch.Tensor]], parts: int) -> list[dict[str, torch.Tensor]]:
    """Each micro-batch cut into ``parts`` row chunks: the same rows, the same step."""
    out = []
    for batch in micro:
        rows = batch["input_ids"].shape[0]
        for chunk in range(min(parts, rows)):
            index = torch.tensor_split(torch.arange(rows), min(parts, rows))[chunk]
            out.append({k: v[index] if v.ndim > 0 else v for k, v in batch.items()})
    return out


# Allocation failures that reach Python as a plain RuntimeError rather than OutOfMemoryError.
_ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device (or the CPU guard) running out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _ALLOCATION_FAILURES)
