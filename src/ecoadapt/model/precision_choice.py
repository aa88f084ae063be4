"""precision.mode: auto: the cheapest precision this device runs well, from measurements.

- A GPU with native bfloat16 (Ampere and later): bf16 mixed precision (fp32 weights and
  optimizer, 16-bit matmuls), which on the H200 trained at 0.39x the energy of fp32 with the
  same held-out loss (BENCHMARKS.md); without native bfloat16, fp16 with loss scaling.
- A CPU: bf16 where the matmul probe (:func:`ecoadapt.measure.flops.peak_flops`, cached per CPU
  model and thread count) runs bfloat16 at least :data:`BF16_MIN_SPEEDUP` times as fast as
  fp32 (CPUs with AMX or AVX-512 BF16); fp32 where it does not (an EPYC without AVX-512 ran
  bf16 at 16 vs 118 GFLOP/s: 16-bit there costs time and joules and saves only memory).

Mixed bf16 rather than bf16-pure: it keeps fp32 weights, so it changes the arithmetic least;
bf16-pure and layer maps stay a choice the user makes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ecoadapt.measure import flops

# bf16 must beat fp32's matmul rate by this much on a CPU to be chosen: the rest of a step
# (norms, softmax, optimizer) does not speed up, and a run in fp32 changes nothing.
BF16_MIN_SPEEDUP = 1.2


def choose(device: torch.device) -> dict[str, Any]:
    """The precision auto picks on ``device``: {"mode", "why", "probe_s"}.

    ``probe_s``: seconds spent measuring matmul rates now (0 when cached, and on GPUs).
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            why = f"{torch.cuda.get_device_name(device)} runs bfloat16 natively"
            return {"mode": "bf16", "why": why, "probe_s": 0.0}
        why = f"{torch.cuda.get_device_name(device)} has no native bfloat16: fp16 with loss scaling"
        return {"mode": "fp16", "why": why, "probe_s": 0.0}
    start = time.perf_counter()
    fp32, _ = flops.peak_flops(device, torch.float32)
    bf16, _ = flops.peak_flops(device, torch.bfloat16)
    rates = f"bf16 matmuls at {bf16 / 1e9:,.0f} GFLOP/s on this CPU vs {fp32 / 1e9:,.0f} in fp32 (measured)"
    mode = "bf16" if bf16 >= BF16_MIN_SPEEDUP * fp32 else "fp32"
    why = rates + (": 16-bit is faster here" if mode == "bf16" else ": 16-bit would cost time and joules here")
    return {"mode": mode, "why": why, "probe_s": time.perf_counter() - start}


def resolve(cfg: Any, device: torch.device) -> dict[str, Any] | None:
    """Replace precision.mode auto in ``cfg`` (a RunConfig) by :func:`choose`'s mode, in place;
    the choice, or None when the mode was not auto."""
    if cfg.precision.mode != "auto":
        return None
    choice = choose(device)
    cfg.precision.mode = choice["mode"]
    return choice
