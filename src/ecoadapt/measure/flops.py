"""Model FLOPs per training token, the device's measured matmul peak, and MFU.

MFU = model FLOPs per token x tokens/s / peak FLOP/s of the device in the run's precision.

Model FLOPs follow the PaLM convention (matmuls only; recomputation under gradient
checkpointing is not counted, so checkpointing lowers MFU honestly), extended to runs that do
not train everything:

- forward: 2 x (matmul weights of every block) + 4 x seq x d_model per block (attention scores
  and their weighted sum) + 2 x head weights x (fraction of positions through the head: the
  masked fraction for masked LM);
- backward, for the head and for every block at or above the lowest block with a trainable
  weight: 2 x weights (input gradients) + 8 x seq x d_model per block (attention), plus
  2 x *trainable* weights (weight gradients). Blocks below run forward only.

A full fine-tune gives the usual 6 N + 12 L seq d. The peak comes from a short matmul probe on
the device, in the run's precision, cached per device, dtype and thread count; or from
``measure.peak_flops``. Never a constant for one GPU.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoadapt.core.progress import say
from ecoadapt.core.storage import atomic_write_text, cache_root, read_cache


@dataclass
class FlopCount:
    """Training FLOPs per input token, with the parts that make them up.

    Attributes:
        per_token: total model FLOPs per training token.
        forward: forward-pass FLOPs per token.
        backward: backward-pass FLOPs per token.
        lowest_trained_block: index of the lowest block with trainable weights (None: none).
    """

    per_token: float
    forward: float
    backward: float
    lowest_trained_block: int | None


def _linear_weights(module: nn.Module) -> tuple[int, int]:
    """(all, trainable) weight elements of the Linear layers in ``module`` (LoRA's included)."""
    total = trainable = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):  # by its shape: a 4-bit weight stores two values a byte
            total += m.in_features * m.out_features
            trainable += m.in_features * m.out_features if m.weight.requires_grad else 0
    return total, trainable


def training_flops(
    model: nn.Module, blocks: nn.ModuleList, seq_len: int, d_model: int, head_fraction: float = 1.0
) -> FlopCount:
    """Model FLOPs per training token of ``model`` as its parameters are frozen now.

    Args:
        model: the model (PEFT-wrapped or not).
        blocks: its stack of transformer blocks.
        seq_len: tokens per sequence (attention cost grows with it).
        d_model: hidden size.
        head_fraction: fraction of positions that go through the LM head (the masked fraction
            for masked LM, where only masked positions are projected to the vocabulary).
    """
    per_block = [_linear_weights(b) for b in blocks]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    head_total = head_trainable = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in in_blocks:
            head_total += m.in_features * m.out_features
            head_trainable += m.in_features * m.out_features if m.weight.requires_grad else 0
    trained = [i for i, (_, t) in enumerate(per_block) if t > 0]
    lowest = trained[0] if trained else None
    attention = 4.0 * seq_len * d_model
    forward = sum(2.0 * p + attention for p, _ in per_block) + 2.0 * head_total * head_fraction
    backward = 2.0 * head_trainable * head_fraction
    if lowest is not None:
        backward += 2.0 * head_total * head_fraction  # input gradients through the head
        for p, t in per_block[lowest:]:
            backward += 2.0 * p + 2.0 * attention + 2.0 * t
    return FlopCount(forward + backward, forward, backward, lowest)


def _cache_path() -> Path:
    return cache_root() / "peak_flops.json"


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a peak depends on: the device model, the dtype and (on CPU) the thread count."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return f"v{PROBE_VERSION}|cuda|{name}|{dtype}|tf32={tf32}"
    from ecoadapt.measure.environment import cpu_name

    return f"v{PROBE_VERSION}|cpu|{cpu_name()}|{dtype}|threads={torch.get_num_threads()}"


PROBE_VERSION = 3  # part of the cache key: a changed probe is measured afresh


# Square matmul sizes of the probe: large enough to reach the device's steady matmul rate (a
# 1024^3 fp32 matmul is about 8 ms on a CPU core; 4096^3 saturates a data-centre GPU).
PROBE_N_CPU = 1024
PROBE_N_CUDA = 4096
PROBE_TRIALS = 3  # the best of these: one slow trial on a busy machine is not the device's peak


def measure_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Measured matmul FLOP/s of ``device`` in ``dtype``: the best of a few trials, about
    ``seconds`` in all.

    The probe is ``F.linear`` (input times transposed weight), the op of every nn.Linear: on
    some CPUs a plain fp16 ``a @ b`` takes a path 50x slower than the one Linear layers use.
    """
    n = PROBE_N_CUDA if device.type == "cuda" else PROBE_N_CPU
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def op() -> torch.Tensor:
        return torch.nn.functional.linear(a, b)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: kernel selection, caches, clocks
        op()
    sync()
    best = 0.0
    for _ in range(PROBE_TRIALS):
        reps, start = 0, time.perf_counter()
        while True:
            for _ in range(2):
                op()
            reps += 2
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / PROBE_TRIALS:
                break
        best = max(best, 2.0 * n**3 * reps / elapsed)
    return best


def peak_flops(
    device: torch.device, dtype: torch.dtype, given: float | None = None, at_least: float | None = None
) -> tuple[float, str]:
    """The device's peak FLOP/s in ``dtype`` and where it came from ("given", "measured", "cache").

    The cache keeps the highest peak ever probed. A cached peak below ``at_least`` (a rate a run
    has just achieved, so the probe that set it ran on a busy machine) is probed again.
    """
    if given is not None:
        return given, "given"
    path = _cache_path()
    key = device_key(device, dtype)
    loaded = read_cache(path, say)
    cache = loaded if isinstance(loaded, dict) else {}
    cached = float(cache[key]) if key in cache else None
    if cached is not None and (at_least is None or cached >= at_least):
        return cached, "cache"
    value = max(measure_peak(device, dtype), cached or 0.0)
    cache[key] = value
    with contextlib.suppress(OSError):  # the cache only saves a probe next time
        atomic_write_text(path, json.dumps(cache, indent=1))
    return value, "measured"


def model_mfu(
    model: nn.Module,
    blocks: nn.ModuleList,
    seq_len: int,
    d_model: int,
    tokens_per_s: float,
    device: torch.device,
    dtype: torch.dtype,
    given_peak: float | None = None,
    head_fraction: float = 1.0,
) -> dict[str, Any]:
    """The flops part of summary.json for a model training at ``tokens_per_s``: its FLOPs per
    token (:func:`training_flops`) against the device's peak in ``dtype`` (:func:`peak_flops`)."""
    count = training_flops(model, blocks, seq_len, d_model, head_fraction)
    peak, source = peak_flops(device, dtype, given_peak, at_least=count.per_token * tokens_per_s)
    return mfu_report(count, tokens_per_s, peak, source)


def mfu_report(count: FlopCount, tokens_per_s: float, peak: float, peak_source: str) -> dict[str, Any]:
    """The flops part of summary.json, and the MFU itself."""
    achieved = count.per_token * tokens_per_s
    mfu = achieved / peak if peak > 0 else None
    note = None
    if mfu is not None and mfu > 1:
        # Impossible by definition: the probe missed the kernels this run used. Say so rather
        # than print a number above 100%.
        note = f"achieved {achieved / 1e9:,.0f} GFLOP/s exceeds the probed peak; MFU not reported"
        mfu = None
    return {
        "mfu": mfu,
        "note": note,
        "model_flops_per_token": count.per_token,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "peak_source": peak_source,
        "count": asdict(count),
        "convention": "PaLM model FLOPs (matmuls, no recomputation); peak = matmul probe in the run's dtype",
    }
