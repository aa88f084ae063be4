"""Stopping on the held-out loss, evaluated every ``train.eval_every`` steps: early stopping
when it stops improving, and the target loss of an equal-quality comparison."""

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


@dataclass
class TargetLoss:
    """train.target_loss: training ends at the first evaluation whose held-out loss is at or
    below ``loss``; what it took to get there is recorded (the joules to the target are what
    an equal-quality comparison ranks recipes by).

    Attributes:
        loss: the target held-out loss.
        reached: step, tokens (all processes), training joules (the job's) and held-out loss
            of the evaluation that reached it; None until then.
        best: the lowest held-out loss evaluated so far (how close a run that never got there came).
    """

    loss: float
    reached: dict[str, Any] | None = None
    best: float = float("inf")

    def check(self, step: int, loss: float, tokens: int, joules: float | None) -> bool:
        """Record an evaluation; True the first time it reaches the target."""
        self.best = min(self.best, loss)
        if self.reached is None and loss <= self.loss:
            self.reached = {"step": step, "tokens": tokens, "train_joules": joules, "eval_loss": loss}
            return True
        return False

    def summary(self, steps: int) -> dict[str, Any]:
        """The target part of summary.json: whether and when it was reached, in ``steps`` steps."""
        return {
            "loss": self.loss,
            "reached": self.reached is not None,
            **(self.reached or {}),
            "best_eval_loss": self.best if self.best < float("inf") else None,
            "steps_run": steps,
        }
