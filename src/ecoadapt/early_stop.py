"""Early stopping on the held-out loss, evaluated every ``train.eval_every`` steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class EarlyStop:
    """Tracks held-out losses and says when they stopped improving.

    Attributes:
        patience: evaluations without an improvement of at least ``min_delta`` before stopping
            (None: never stop, only record).
        min_delta: smallest drop of the loss that counts as an improvement.
        history: (step, loss) of every evaluation.
    """

    patience: int | None
    min_delta: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)
    best: float = float("inf")
    stale: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when training should stop."""
        self.history.append((step, loss))
        if loss < self.best - self.min_delta:
            self.best = loss
            self.stale = 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience


def combine(*checks: Callable[..., str | None] | None) -> Callable[..., str | None] | None:
    """One should_stop callback from several (the first reason wins); None when there are none."""
    active = [c for c in checks if c is not None]
    if not active:
        return None

    def check(result: object) -> str | None:
        for c in active:
            reason = c(result)
            if reason:
                return reason
        return None

    return check
