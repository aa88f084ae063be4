"""The probe behind `ecoadapt plan`: a recipe's first steps at small micro-batches, measured.

The recipe is built exactly as a run builds it (:func:`ecoadapt.train.prepare.build`: LoRA, frozen
blocks, precision, checkpointing, compile) and trained with the run's own step functions on
random token blocks of the run's length (time and memory do not depend on which tokens),
at one micro-batch size per process (`ecoadapt plan` runs the run's own and half of it, each
in a fresh process), a few steps each. What it measures: seconds of the
forward/backward and of the optimizer step, the peak memory of the training steps (the same
figure as a run's training window), and the meter's joules. The weights, gradients and
optimizer state are also counted from the shapes, for the forecast's breakdown.

It runs in a child process (``python -m ecoadapt.forecast.trial_steps CONFIG.json SIZES OUT.json``), as
each sweep point does: a process's resident peak never goes down, and on a CPU it depends on
what the process allocated before, so each size needs its own.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecoadapt.config import RunConfig, from_dict
from ecoadapt.core import storage
from ecoadapt.core.progress import say
from ecoadapt.data.batches import BlockLoader
from ecoadapt.measure import energy, memory
from ecoadapt.measure.phases import Phases
from ecoadapt.model import parallel
from ecoadapt.model.footprint import static_bytes
from ecoadapt.train import prepare
from ecoadapt.train.heldout import heldout
from ecoadapt.train.loop import Loop, accumulate, apply_step
from ecoadapt.train.micro_batch import is_out_of_memory

WARMUP_STEPS = 2  # the first steps allocate the optimizer state, pick kernels and compile
TIMED_STEPS = 3  # the median of these is the probe's step time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Trial:
    """What every micro-batch size's trial steps share."""

    loop: Loop
    objective: str
    mask: Any
    blocks: torch.Tensor
    tracker: energy.EnergyTracker
    windows: memory.MemoryWindows
    rss_before_load: int
    memory_limit: int | None


def _step_times(t: _Trial, batches: Any) -> tuple[float, float, float]:
    """One step: (forward + backward s, optimizer s, whole s), the device synchronised for each."""
    loop, device = t.loop, t.loop.device
    t0 = time.perf_counter()
    step_loss, _, _ = accumulate(loop.model, [next(batches)], t.objective, loop.policy, device, 1, t.memory_limit)
    _sync(device)
    t1 = time.perf_counter()
    apply_step(loop, step_loss)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t2 - t0


def _time_size(t: _Trial, size: int, seed: int) -> dict[str, Any]:
    """Warm-up and timed steps at one micro-batch size: medians of their parts, peak, joules."""
    device = t.loop.device
    batches = iter(BlockLoader(t.blocks, size, t.objective, t.mask, seed))
    micro, optim, first = [], [], 0.0
    phases = Phases(t.tracker, t.windows)
    # Memory over every step (warm-up included: its allocations are the run's too), energy over
    # the timed steps alone.
    with phases.window("train", energy=False) as whole:
        for step in range(WARMUP_STEPS):
            whole_s = _step_times(t, batches)[2]
            if step == 0:
                first = whole_s  # the one-off costs (allocator growth, autotuning) show here
        with phases.window("timed", memory=None) as timed:
            for _ in range(TIMED_STEPS):
                m, o, _ = _step_times(t, batches)
                micro.append(m)
                optim.append(o)
    assert whole.peaks is not None and timed.energy is not None
    measured, peak = timed.energy, whole.peaks["peak"]
    peak = peak if device.type == "cuda" else max(0, peak - t.rss_before_load)
    return {
        "micro_batch": size,
        "micro_s": statistics.median(micro),
        "optimizer_s": statistics.median(optim),
        "step_s": statistics.median(m + o for m, o in zip(micro, optim, strict=True)),
        "first_step_s": first,
        "peak_bytes": peak,
        "joules_per_step": measured.joules / TIMED_STEPS,
        "watts": measured.watts,
    }


def measure_trial_steps(cfg: RunConfig, sizes: list[int]) -> dict[str, Any]:
    """Build ``cfg``'s recipe and time its steps at each micro-batch size in ``sizes`` (ascending).

    Returns:
        device, counts, static bytes, compile seconds, energy method and meter, and per size:
        micro_batch, micro_s (forward + backward), optimizer_s, step_s, first_step_s,
        peak_bytes (the run's memory figure), joules_per_step, watts.
    """
    device = parallel.pick_device(cfg.train.device)
    world = parallel.World()
    rss_before_load = memory.rss_bytes()
    tracker = energy.EnergyTracker.for_config(cfg.measure, device.type, device.index, 0, lambda _: None)
    loaded = prepare.load_model(cfg, device, world, guard=False)
    vocab = len(loaded.tokenizer)
    n = max(sizes) * (WARMUP_STEPS + TIMED_STEPS)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    blocks = torch.randint(0, vocab, (n, cfg.data.max_seq_len), generator=generator)
    built = prepare.build(cfg, loaded, blocks, device, world, lambda _: None)
    loop = Loop.create(built.model, 10**9, cfg.train, built.policy, loaded.objective, device, new=loaded.fresh)
    # The run measures the held-out loss before it trains: that first forward pass pays for the
    # device's set-up (CUDA context, cuBLAS handles, inference graphs where blocks compile)
    # outside training's window. So does the probe, or its one-off cost (first step minus a
    # steady one) counts that set-up as training's: 3.3x the measured time per step for a
    # 20-step run on an H200, 8x with compiled blocks (BENCHMARKS.md).
    rows = min(sizes)
    heldout(loop.model, blocks[:rows], loaded.objective, built.mask, rows, loop.policy, device)
    loop.model.train()  # dropout and checkpointing act only in training mode, as in the run
    windows = memory.MemoryWindows(device)
    limit = cfg.train.max_memory_gb
    memory_limit = int(limit * 2**30) if limit is not None and device.type == "cpu" else None
    out: dict[str, Any] = {"device": str(device), "counts": built.counts}
    out["static_bytes"] = static_bytes(parallel.unwrap(built.model), built.policy, cfg.train.optimizer)
    out["flops_per_token"] = prepare.flop_count(parallel.unwrap(built.model), loaded, cfg).per_token
    trial = _Trial(loop, loaded.objective, built.mask, blocks, tracker, windows, rss_before_load, memory_limit)
    out["sizes"] = [_time_size(trial, size, cfg.train.seed) for size in sizes]
    out["compile_s"] = built.compiled.compile_s
    out["compiled"] = built.compiled.report()["compiled"]
    out["energy_method"], out["meter"] = tracker.method, tracker.meter_name
    on_cuda = device.type == "cuda"
    out["memory_figure"] = "CUDA allocated peak" if on_cuda else "resident peak above the pre-load baseline"
    return out


def main(argv: list[str]) -> int:
    """``python -m ecoadapt.forecast.trial_steps CONFIG.json SIZES OUT.json`` (SIZES: comma-separated)."""
    config_path, sizes_text, out_path = argv
    cfg = from_dict(json.loads(Path(config_path).read_text()), config_path)
    sizes = sorted({int(s) for s in sizes_text.split(",")})
    try:
        result = measure_trial_steps(cfg, sizes)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        result = {"out_of_memory": str(e).splitlines()[0][:300]}
    storage.atomic_write_text(Path(out_path), json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as e:  # the parent reads the last line of stderr as the error
        say(f"plan probe failed: {type(e).__name__}: {e}")
        sys.exit(1)
