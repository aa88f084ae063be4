"""A run's forecast from its own first steps: no extra process, no extra step, no extra joule.

``ecoadapt plan`` measures trial steps in child processes because it forecasts before anything
trains. A run has no need to: its first optimizer steps are the measurement. After
``WARMUP_STEPS`` (allocation, kernel choice, compiling) and ``TIMED_STEPS`` more, the median
step time, the joules per step of the training window, and the training window's peak memory
so far give the same per-step figures the trial steps give, and from them the forecast of the
whole run (:func:`ecoadapt.forecast.planner.recipe_forecast`, budgets applied). The run's
summary keeps that forecast beside what it then measured (``versus_measured``).

The cost: one clock read and one meter read after each of the first few steps, and on a GPU a
device synchronisation there (so that a step's time is its own); none after them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ecoadapt.config import RunConfig
from ecoadapt.core.progress import fmt_duration
from ecoadapt.forecast.planner import beside_measured, recipe_forecast
from ecoadapt.forecast.trial_steps import TIMED_STEPS, WARMUP_STEPS
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.measure.memory import MemoryWindows
from ecoadapt.model.footprint import static_bytes
from ecoadapt.model.precision import Policy


class FirstSteps:
    """Watches the first steps of a run's training window; forecasts the run from them.

    Args:
        cfg: the run's config; planned_steps: the steps it is to take (budgets cut them).
        tracker: the run's energy tracker (its ``train`` window is open while steps run).
        memory: the run's memory windows (the ``train`` window's peak is read).
        device: the training device (synchronised after each watched step on CUDA).
        model, policy: what trains (for the static part of memory, counted from the shapes).
        compile_s: seconds spent compiling so far (read when the forecast is made).
        rss_before_load: resident set (bytes) before the model was loaded (CPU peaks are above it).
        log: where the forecast is said, once, right after the last watched step.
    """

    def __init__(
        self,
        cfg: RunConfig,
        planned_steps: int,
        tracker: EnergyTracker,
        memory: MemoryWindows,
        device: torch.device,
        model: torch.nn.Module,
        policy: Policy,
        compile_s: Callable[[], float],
        rss_before_load: int,
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.planned_steps = cfg, planned_steps
        self.tracker, self.memory, self.device = tracker, memory, device
        self.model, self.policy, self.compile_s = model, policy, compile_s
        self.rss_before_load, self.log = rss_before_load, log
        self._marks: list[tuple[float, float]] = []  # (s, J) at the start and after each watched step
        self._peak = 0
        self.needed = WARMUP_STEPS + TIMED_STEPS

    @property
    def done(self) -> bool:
        """Whether enough steps were watched for a forecast."""
        return len(self._marks) > self.needed

    def start(self) -> None:
        """Mark the start of the first step (after anything the window does before training)."""
        self._marks = [self._mark()]

    def after_step(self, result: Any) -> None:
        """Called by the loop after every optimizer step: cheap, and nothing once done."""
        if self.done or not self._marks:
            return
        self._marks.append(self._mark())
        if self.done:
            self._peak = self.memory.current_peak()
            self._say()

    def _mark(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a step's time is its own, not what was queued
        return time.perf_counter(), self.tracker.running("train")

    def _say(self) -> None:
        """The whole run's forecast, said as soon as the first steps have measured it."""
        f = recipe_forecast(self.cfg, self.planned_steps, self.trials())
        self.log(
            f"forecast from the first {self.needed} steps: about {fmt_duration(f['time_s'])} and "
            f"{f['joules']:,.0f} J ({f['energy_method']}) of training for {f['steps']} steps, "
            f"peak memory {f['peak_bytes'] / 2**20:,.0f} MiB"
        )

    def beside_measured(self, summary: Any) -> dict[str, Any] | None:
        """summary.json's ``forecast``: the forecast and the run's measured figures beside it."""
        return beside_measured(self.cfg, self.planned_steps, self.trials(), summary)

    def trials(self) -> dict[str, Any]:
        """The measurements in the trial steps' form (one size: the run's own); ``{"error"}``
        when the run ended before enough steps were watched."""
        if not self.done:
            watched = max(0, len(self._marks) - 1)
            return {"error": f"the run took {watched} steps; a forecast from its first steps needs {self.needed}"}
        seconds = [b[0] - a[0] for a, b in zip(self._marks, self._marks[1:], strict=False)]
        joules = [b[1] - a[1] for a, b in zip(self._marks, self._marks[1:], strict=False)]
        timed_s = seconds[WARMUP_STEPS:]
        step_s = statistics.median(timed_s)
        timed_j = sum(joules[WARMUP_STEPS:])
        on_cuda = self.device.type == "cuda"
        peak = self._peak if on_cuda else max(0, self._peak - self.rss_before_load)
        size = {
            "micro_batch": self.cfg.train.micro_batch_size,
            # The step is timed whole: its optimizer part is spread over the micro-batches.
            "micro_s": step_s / self.cfg.train.grad_accum,
            "optimizer_s": 0.0,
            "step_s": step_s,
            "first_step_s": seconds[0],
            "peak_bytes": peak,
            "joules_per_step": timed_j / len(timed_s),
            "watts": timed_j / sum(timed_s) if sum(timed_s) > 0 else 0.0,
        }
        return {
            "device": str(self.device),
            "sizes": [size],
            "static_bytes": static_bytes(self.model, self.policy, self.cfg.train.optimizer),
            "compile_s": self.compile_s(),
            "energy_method": self.tracker.method,
            "meter": self.tracker.meter_name,
            "memory_figure": "CUDA allocated peak" if on_cuda else "resident peak above the pre-load baseline",
            "source": f"the run's own first {self.needed} steps",
            "cached": False,
        }
