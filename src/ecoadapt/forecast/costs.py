"""A recipe's cost before it runs: peak memory, seconds per step and joules, from a probe.

:mod:`ecoadapt.forecast.trial_steps` measures the recipe at two micro-batch sizes below the run's (a few
steps each); here those two points become the forecast:

- peak memory is linear in the micro-batch: weights, gradients and optimizer state do not grow
  with it, activations do (per block row, at this sequence length, with or without
  checkpointing as the recipe says). The two probes give the slope (activations per row) and
  the intercept; the static part is also counted from the shapes, for the breakdown. Each size
  is probed in a fresh process, as a run starts: on a CPU the resident peak depends on what
  the process allocated before (glibc keeps freed memory), so sizes probed one after the other
  in one process read low (measured: 646 MiB at 8 after 4, 808 MiB at 8 alone).
- per-row cost is not linear over a wide range on a CPU (caches: MiniLM's forward and backward
  took 0.051 s per row from 4 to 8 rows and 0.076 from 8 to 16), so the probe runs the run's
  own micro-batch and half of it; only a micro-batch that does not fit is extrapolated, from
  a quarter and a half.
- seconds per step: forward and backward are linear in the micro-batch (fixed launch and
  Python overhead plus work per row), repeated train.grad_accum times; the optimizer step once.
- joules: the probe's mean power (the meter's own, measured or estimated) times the forecast
  time. The first steps' extra time (allocation, kernel selection, compiling) is a one-off.
- the step count: train.max_steps (or train.epochs over the corpus's blocks), cut by a budget
  (energy, time, tokens) where one is set, as the loop would cut it.

Pure arithmetic on plain data: no torch here.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

GIB = 2**30


def trial_sizes(micro_batch: int, fits: bool = True) -> list[int]:
    """Micro-batch sizes to probe for a run of ``micro_batch``: half of it and itself (the
    forecast at the run's size is then a measurement); when the run's size does not fit, a
    quarter and a half (the forecast extrapolates by 2x). 1 alone for 1."""
    if micro_batch == 1:
        return [1]
    if fits:
        return [max(1, micro_batch // 2), micro_batch]
    quarter, half = max(1, micro_batch // 4), max(1, micro_batch // 2)
    return [quarter, half] if quarter < half else [half]


def _line(xs: list[float], ys: list[float], x: float) -> tuple[float, float]:
    """(value at ``x``, slope) of the line through the points; one point: (its value, 0)."""
    if len(xs) == 1 or xs[-1] == xs[0]:
        return ys[-1], 0.0
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    return ys[0] + slope * (x - xs[0]), slope


def per_step(probe: dict[str, Any], micro_batch: int, grad_accum: int, tokens_per_step: int) -> dict[str, Any]:
    """The per-step forecast of a recipe from its probe.

    Args:
        probe: :func:`ecoadapt.forecast.trial_steps.measure_trial_steps`'s result.
        micro_batch: blocks per micro-batch of the run; grad_accum: micro-batches per step.
        tokens_per_step: input tokens of one optimizer step (all processes).

    Returns:
        peak_bytes with its parts (weights, gradients, optimizer, activations, other), step_s,
        tokens_per_s, joules_per_step, watts, one_off_s, one_off_joules, probed_at.
    """
    sizes = probe["sizes"]
    xs = [float(s["micro_batch"]) for s in sizes]
    peak, per_row = _line(xs, [float(s["peak_bytes"]) for s in sizes], micro_batch)
    micro_s, _ = _line(xs, [float(s["micro_s"]) for s in sizes], micro_batch)
    optimizer_s = statistics.median(float(s["optimizer_s"]) for s in sizes)
    step_s = max(1e-9, grad_accum * micro_s + optimizer_s)
    watts = float(sizes[-1]["watts"])
    static = {k: int(v) for k, v in probe["static_bytes"].items()}
    activations = max(0.0, per_row * micro_batch)
    one_off_s = max(0.0, float(sizes[0]["first_step_s"]) - float(sizes[0]["step_s"]))
    return {
        "peak_bytes": int(peak),
        "parts_bytes": {
            **static,
            "activations": int(activations),
            # Allocator and runtime (CUDA context, libraries on CPU) and the loss's chunks.
            "other": int(peak - sum(static.values()) - activations),
        },
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "joules_per_step": watts * step_s,
        "watts": watts,
        "one_off_s": one_off_s,
        "one_off_joules": watts * one_off_s,
        "compile_s": float(probe.get("compile_s", 0.0)),
        "probed_at": [int(x) for x in xs],
    }


def run_length(
    step: dict[str, Any],
    steps: int,
    tokens_per_step: int,
    energy_j: float | None = None,
    time_s: float | None = None,
    tokens: int | None = None,
) -> dict[str, Any]:
    """Steps, seconds and joules of the whole training run, a budget cutting it where set.

    The loop checks budgets after each step and stops after the step that reached one: the
    step count is the first that reaches the budget, or ``steps``.
    """
    one_off_s, one_off_j = step["one_off_s"], step["one_off_joules"]
    limits: dict[str, int] = {}
    if energy_j is not None:
        limits["energy_j"] = max(1, math.ceil((energy_j - one_off_j) / step["joules_per_step"]))
    if time_s is not None:
        limits["time_s"] = max(1, math.ceil((time_s - one_off_s) / step["step_s"]))
    if tokens is not None:
        limits["tokens"] = max(1, math.ceil(tokens / tokens_per_step))
    stopped_by = min(limits, key=lambda k: limits[k]) if limits else None
    if stopped_by is not None and limits[stopped_by] >= steps:
        stopped_by = None
    n = limits[stopped_by] if stopped_by is not None else steps
    return {
        "steps": n,
        "stopped_by": stopped_by,
        "time_s": one_off_s + n * step["step_s"],
        "joules": one_off_j + n * step["joules_per_step"],
    }


def compare(forecast: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """Forecast beside measured, with ratios (forecast / measured) for peak memory, seconds per
    step and joules of training, the forecast taken for the steps the run took (its one-off
    first-step cost spread over them, as the measured time per step has it)."""
    out: dict[str, Any] = {}
    steps = max(1, int(measured["steps"]))
    pairs = {
        "peak_bytes": (forecast["peak_bytes"], measured.get("peak_bytes")),
        "step_s": (
            (forecast["one_off_s"] + steps * forecast["step_s"]) / steps,
            measured["time_s"] / steps if measured.get("time_s") else None,
        ),
        "train_joules": (
            forecast["one_off_joules"] + steps * forecast["joules_per_step"],
            measured.get("train_joules"),
        ),
    }
    for name, (f, m) in pairs.items():
        out[name] = {"forecast": f, "measured": m, "ratio": (f / m) if m else None}
    return out


def fits(peak_bytes: float, joules: float, memory_gb: float | None, energy_j: float | None) -> dict[str, bool | None]:
    """Whether a forecast fits a memory limit (GiB) and an energy budget (J); None: no limit."""
    return {
        "memory": None if memory_gb is None else peak_bytes <= memory_gb * GIB,
        "energy": None if energy_j is None else joules <= energy_j,
    }
