"""The `report:` section of a sweep file: how the report chooses its recommendation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OBJECTIVES = {"energy": "train_joules", "time": "time_s", "memory": "peak_bytes"}  # what each minimises


@dataclass
class ReportSettings:
    """How a report picks its recommendation."""

    tolerance: float = 0.05
    """How far below the best metric a recommended point may be (in the metric's units:
    0.03 is 3 points of macro-F1, or 0.03 nats of held-out loss)."""
    objective: Literal["energy", "time", "memory"] = "energy"
    """What the recommendation minimises among the points within tolerance: training energy,
    training time or peak training memory."""
    max_general_loss_increase: float | None = None
    """The most forgetting a recommended recipe may show: a point whose general-text loss
    (data.general_eval) rose by more than this many nats is not recommended (null: no bound)."""
