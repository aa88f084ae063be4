"""The ``log`` section: where a run's records go besides metrics.jsonl."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]


@dataclass
class LogConfig:
    """Dashboards that receive the run's records (each an optional extra)."""

    to: list[Tracker] = field(default_factory=list)
    """Trackers: tensorboard (event files in the run directory's tensorboard/), mlflow (its
    MLFLOW_TRACKING_URI: a local sqlite or file store works offline), wandb (WANDB_MODE=offline
    works), trackio (its local store). Every metrics.jsonl record at its step, and the
    summary's headline (energy and how it was obtained, mJ per token, peak memory, held-out
    loss, the task's verdict) at the end."""
    project: str = "ecoadapt"
    """The MLflow experiment, W&B or trackio project the run goes to."""
