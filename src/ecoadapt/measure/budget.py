"""Budgets a run stops at: energy (J), time (s), tokens; checked after every optimizer step.

The cheapest joule is the one not spent: when a budget is reached the loop finishes its step,
and the run then evaluates and saves as usual, with ``status: stopped_by_budget``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ecoadapt.config import BudgetConfig
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.train import TrainResult

BUDGETS = ("energy_j", "time_s", "tokens")  # the reasons Budget.check returns


class Budget:
    """Checks a run's training against its limits, and forecasts once whether it will fit."""

    def __init__(
        self, cfg: BudgetConfig, tracker: EnergyTracker, total_steps: int, say: Callable[[str], None] | None = None
    ) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.total_steps = total_steps
        self.say = say
        self.joules_at_start = tracker.total_joules() if cfg.energy_j is not None else 0.0
        self.joules_used = 0.0
        self.forecast: str | None = None
        self._forecast_step = max(3, total_steps // 10)  # after warm-up, the rate is steady

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.cfg.energy_j, self.cfg.time_s, self.cfg.tokens))

    def check(self, result: TrainResult) -> str | None:
        """The name of the budget reached after this step, or None."""
        if self.cfg.energy_j is not None:
            self.joules_used = self.tracker.total_joules() - self.joules_at_start
        if result.steps == self._forecast_step and self.active:
            self._forecast(result)
        if self.cfg.tokens is not None and result.tokens >= self.cfg.tokens:
            return "tokens"
        if self.cfg.time_s is not None and result.time_s >= self.cfg.time_s:
            return "time_s"
        if self.cfg.energy_j is not None and self.joules_used >= self.cfg.energy_j:
            return "energy_j"
        return None

    def _forecast(self, result: TrainResult) -> None:
        scale = self.total_steps / result.steps
        needs = {
            "time_s": (result.time_s * scale, self.cfg.time_s, "s"),
            "energy_j": (self.joules_used * scale, self.cfg.energy_j, "J"),
            "tokens": (result.tokens * scale, self.cfg.tokens, "tokens"),
        }
        parts = []
        for name, (need, limit, unit) in needs.items():
            if limit is not None:
                verdict = "fits" if need <= limit else f"will stop at about {limit / need:.0%} of the steps"
                parts.append(f"{name}: needs ~{need:,.0f} {unit} of {limit:,.0f} ({verdict})")
        self.forecast = f"budget forecast after {result.steps} steps: " + "; ".join(parts)
        if self.say is not None:
            self.say(self.forecast)

    def summary(self, result: TrainResult) -> dict[str, Any] | None:
        """The budget part of summary.json (None when no limit is set)."""
        if not self.active:
            return None
        used = {"time_s": result.time_s, "tokens": result.tokens, "energy_j": self.joules_used}
        limits = {"time_s": self.cfg.time_s, "tokens": self.cfg.tokens, "energy_j": self.cfg.energy_j}
        return {
            "limits": limits,
            "used": {k: v for k, v in used.items() if limits[k] is not None},
            "fraction_used": {k: used[k] / limit for k, limit in limits.items() if limit is not None},
            "stopped_by": result.stopped_by,
            "forecast": self.forecast,
        }
