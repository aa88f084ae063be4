"""Budgets a run stops at: energy (J), time (s), tokens; checked after every optimizer step.

The cheapest joule is the one not spent: when a budget is reached the loop finishes its step,
and the run then evaluates and saves as usual, with ``status: stopped_by_budget``. Budgets are
the job's: under data parallelism the caller passes the joules summed over every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ecoadapt.config import BudgetConfig

BUDGETS = ("energy_j", "time_s", "tokens")  # the reasons Budget.check returns


class Progressed(Protocol):
    """What a budget reads of the training so far (the loop's result)."""

    steps: int
    tokens: int
    time_s: float
    stopped_by: str | None


class Budget:
    """Checks a run's training against its limits, and forecasts once whether it will fit.

    Args:
        cfg: the budget section.
        spent_joules: training joules so far (the job's, every part of a resumed run); called
            at every check when an energy budget is set.
        total_steps: the steps the run would take without a budget (for the forecast).
        tokens_scale: input tokens of the whole job per token counted by ``Progressed.tokens``
            (the number of ranks: each rank counts its own share).
        say: where the forecast line goes.
    """

    def __init__(
        self,
        cfg: BudgetConfig,
        spent_joules: Callable[[], float],
        total_steps: int,
        say: Callable[[str], None] | None = None,
        tokens_scale: int = 1,
    ) -> None:
        self.cfg = cfg
        self.spent_joules = spent_joules
        self.total_steps = total_steps
        self.say = say
        self.tokens_scale = tokens_scale
        self.joules_used = 0.0
        self.forecast: str | None = None
        self._forecast_step = max(3, total_steps // 10)  # after warm-up, the rate is steady

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.cfg.energy_j, self.cfg.time_s, self.cfg.tokens))

    def check(self, result: Progressed) -> str | None:
        """The name of the budget reached after this step, or None."""
        if self.cfg.energy_j is not None:
            self.joules_used = self.spent_joules()
        tokens = result.tokens * self.tokens_scale
        if result.steps == self._forecast_step and self.active:
            self._forecast(result, tokens)
        if self.cfg.tokens is not None and tokens >= self.cfg.tokens:
            return "tokens"
        if self.cfg.time_s is not None and result.time_s >= self.cfg.time_s:
            return "time_s"
        if self.cfg.energy_j is not None and self.joules_used >= self.cfg.energy_j:
            return "energy_j"
        return None

    def _forecast(self, result: Progressed, tokens: int) -> None:
        scale = self.total_steps / result.steps
        needs = {
            "time_s": (result.time_s * scale, self.cfg.time_s, "s"),
            "energy_j": (self.joules_used * scale, self.cfg.energy_j, "J"),
            "tokens": (tokens * scale, self.cfg.tokens, "tokens"),
        }
        parts = []
        for name, (need, limit, unit) in needs.items():
            if limit is not None:
                verdict = "fits" if need <= limit else f"will stop at about {limit / need:.0%} of the steps"
                parts.append(f"{name}: needs ~{need:,.0f} {unit} of {limit:,.0f} ({verdict})")
        self.forecast = f"budget forecast after {result.steps} steps: " + "; ".join(parts)
        if self.say is not None:
            self.say(self.forecast)

    def summary(self, result: Progressed) -> dict[str, Any] | None:
        """The budget part of summary.json (None when no limit is set)."""
        if not self.active:
            return None
        used = {"time_s": result.time_s, "tokens": result.tokens * self.tokens_scale, "energy_j": self.joules_used}
        limits = {"time_s": self.cfg.time_s, "tokens": self.cfg.tokens, "energy_j": self.cfg.energy_j}
        return {
            "limits": limits,
            "used": {k: v for k, v in used.items() if limits[k] is not None},
            "fraction_used": {k: used[k] / limit for k, limit in limits.items() if limit is not None},
            "stopped_by": result.stopped_by,
            "forecast": self.forecast,
        }
