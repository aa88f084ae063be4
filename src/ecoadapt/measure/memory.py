"""Peak memory per window: CUDA tensor memory on GPU, the process's resident set on CPU.

Every figure belongs to a window (training, evaluation): the peak is reset when a window begins
and read when it ends, so an evaluation that builds whole logits never shows up as training's
peak. On CUDA the allocator's peak statistics are reset; on Linux CPUs the kernel's resident
high-water mark (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs``. Where that
cannot be done, the process-lifetime peak is reported and the summary says so.

On CPU the process peak includes the interpreter and libraries, so the figure that compares
recipes is the training peak *above* the resident set just before the model was loaded: what
the recipe itself costs, comparable to GPU tensor memory.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import psutil
import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
RESET_HIGH_WATER_MARK = "5"  # proc(5): "5" resets the peak resident set size (VmHWM) to the current


def rss_bytes() -> int:
    """The process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """The process's peak resident set size since start (or since the last reset), in bytes."""
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _vm_hwm() -> int | None:
    """VmHWM from /proc/self/status in bytes, or None where there is none."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_rss_peak() -> bool:
    """Reset the kernel's resident high-water mark to the current resident set; False where the
    kernel does not allow it (not Linux, or no write access to clear_refs)."""
    try:
        CLEAR_REFS.write_text(RESET_HIGH_WATER_MARK)
    except OSError:
        return False
    return _vm_hwm() is not None


def reset_peak(device: torch.device) -> bool:
    """Start a fresh peak on ``device`` (CUDA allocator statistics, or the CPU high-water mark).

    Returns:
        Whether the peak could be reset (on CUDA always).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_rss_peak()


def cap_cuda_memory(device: torch.device, gib: float) -> float:
    """Limit the caching allocator on ``device`` to ``gib`` GiB; returns the fraction set."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


class MemoryWindows:
    """Peak memory per named window on one device.

    A window begins with a reset of the peak and ends by reading it. Windows nest (a periodic
    evaluation inside training): the outer window's peak so far is kept when the inner one
    resets, and the peak is reset again when the inner one ends, so neither sees the other's.
    A name used for several windows (evaluation before and after training) keeps the highest.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, dict[str, int]] = {}
        self._open: list[str] = []
        self.reset_ok = True  # every window began with a real reset

    def _read(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {
                "peak": int(torch.cuda.max_memory_allocated(self.device)),
                "reserved": int(torch.cuda.max_memory_reserved(self.device)),
            }
        return {"peak": peak_rss_bytes()}

    def _fold(self, name: str) -> dict[str, int]:
        kept = self.peaks.get(name, {})
        self.peaks[name] = {k: max(v, kept.get(k, 0)) for k, v in self._read().items()}
        return self.peaks[name]

    def begin(self, name: str) -> None:
        """Start the window ``name``: the peak is reset (an open outer window keeps its own)."""
        if self._open:
            self._fold(self._open[-1])
        self._open.append(name)
        self.reset_ok &= reset_peak(self.device)

    def current_peak(self) -> int:
        """The peak (bytes) of the innermost open window so far, without ending it."""
        return self._read()["peak"]

    def end(self, name: str) -> dict[str, int]:
        """End the window ``name``; its peak (bytes): ``peak`` and, on CUDA, ``reserved``."""
        peaks = self._fold(name)
        self._open.remove(name)
        if self._open:
            self.reset_ok &= reset_peak(self.device)  # the outer window goes on from here
        return peaks

    def report(self, rss_before_load: int) -> dict[str, Any]:
        """The memory part of summary.json.

        Args:
            rss_before_load: resident set (bytes) just before the model was loaded.

        Returns:
            ``train_peak_bytes`` and ``eval_peak_bytes`` (CUDA: peak allocated, with
            ``*_reserved_bytes``; CPU: peak resident set, with ``*_above_baseline_bytes``),
            ``peak_bytes`` (= training's), ``compare_with`` (the figure ratios between recipes
            use), the device and how the peaks were taken.
        """
        out: dict[str, Any] = {"device": self.device.type, "method": "measured"}
        for window, peaks in self.peaks.items():
            out[f"{window}_peak_bytes"] = peaks["peak"]
            if "reserved" in peaks:
                out[f"{window}_peak_reserved_bytes"] = peaks["reserved"]
            elif self.device.type == "cpu":
                out[f"{window}_peak_above_baseline_bytes"] = max(0, peaks["peak"] - rss_before_load)
        out["peak_bytes"] = out.get("train_peak_bytes")
        if self.device.type == "cuda":
            out["peak_reserved_bytes"] = out.get("train_peak_reserved_bytes")
            out["compare_with"] = "peak_bytes"
            out["windows"] = "CUDA allocator peak statistics, reset at the start of each window"
        else:
            out["baseline_rss_bytes"] = rss_before_load
            out["peak_above_baseline_bytes"] = out.get("train_peak_above_baseline_bytes")
            out["compare_with"] = "peak_above_baseline_bytes"
            out["windows"] = (
                "resident-set high-water mark, reset at the start of each window (/proc/self/clear_refs)"
                if self.reset_ok
                else "process-lifetime resident peak: this system cannot reset it, so each window's figure "
                "includes every earlier one"
            )
        return out


def combine_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's memory: rank 0's report, plus every rank's training peak (max and sum) under
    data parallelism (each rank holds its own copy of what it trains)."""
    out = dict(per_rank[0])
    if len(per_rank) > 1:
        key = out["compare_with"]
        peaks = [m[key] for m in per_rank]
        out.update({"per_rank_peak_bytes": peaks, "max_rank_peak_bytes": max(peaks), "sum_peak_bytes": sum(peaks)})
    return out
