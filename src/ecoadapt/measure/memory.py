"""Peak memory: CUDA tensor memory on GPU, the process's resident set on CPU.

On CPU the process peak includes the interpreter and libraries, so the figure that compares
recipes is the peak *above* the resident set just before the model was loaded: what the recipe
itself costs, comparable to GPU tensor memory.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import psutil
import torch


def rss_bytes() -> int:
    """The process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def reset_cuda_peak(device: torch.device) -> None:
    """Start a fresh CUDA peak window (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def report(device: torch.device, rss_before_load: int) -> dict[str, Any]:
    """The memory part of summary.json.

    Args:
        device: where the model trained.
        rss_before_load: resident set (bytes) just before the model was loaded.

    Returns:
        ``peak_bytes`` (CUDA peak allocated on GPU, process peak RSS on CPU), the device, and
        on CPU ``peak_above_baseline_bytes`` (peak minus the pre-load resident set: the figure
        that ratios between recipes use); on GPU the reserved peak too.
    """
    peak_rss = peak_rss_bytes()
    out: dict[str, Any] = {"device": device.type, "process_peak_rss_bytes": peak_rss, "method": "measured"}
    if device.type == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        out["compare_with"] = "peak_bytes"
    else:
        out["peak_bytes"] = peak_rss
        out["baseline_rss_bytes"] = rss_before_load
        out["peak_above_baseline_bytes"] = max(0, peak_rss - rss_before_load)
        out["compare_with"] = "peak_above_baseline_bytes"
    return out
