"""Early stopping on the held-out loss, evaluated every ``train.eval_every`` steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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

    def state(self) -> list[Any]:
        """What a checkpoint keeps: history, best, stale."""
        return [self.history, self.best, self.stale]

    def load_state(self, state: list[Any]) -> None:
        """Continue from a :meth:`state`."""
        history, self.best, self.stale = state
        self.history = [(int(step), float(loss)) for step, loss in history]

    def summary(self) -> dict[str, Any] | None:
        """The early_stop part of summary.json (None when nothing was evaluated)."""
        return {"history": self.history, "best": self.best} if self.history else None
