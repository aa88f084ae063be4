"""log.to: the dashboards users already watch (TensorBoard, MLflow, Weights & Biases, trackio).

Every record ecoadapt writes to ``metrics.jsonl`` (training loss, learning rate, tokens/s,
cumulative training joules, periodic held-out loss) goes to each tracker at its step, and the
summary's headline (energy with how it was obtained, mJ per token, peak memory, held-out loss,
the task's verdict) at the end. Each library is an optional extra, imported only when named;
all of them work offline: TensorBoard event files in the run directory, MLflow's tracking URI
(``MLFLOW_TRACKING_URI``: a local sqlite database, or plain files with
``MLFLOW_ALLOW_FILE_STORE=true``), W&B with ``WANDB_MODE=offline``, trackio's local database.
Only rank 0 logs (the records are the job's).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecoadapt.core.errors import UserError

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
# The module each tracker needs, and how to install it.
_NEEDS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric fields of a record (nested dicts flattened with ``/``), bools left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``section/key`` -> its value in words (a run's parameters)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def headline(summary: Any) -> dict[str, Any]:
    """What a dashboard shows of a finished run: numbers, and the labels they need."""
    energy, memory, task = summary.energy or {}, summary.memory or {}, summary.task
    out: dict[str, Any] = {
        "train_joules": energy.get("train_joules"),
        "mj_per_token": energy.get("mj_per_token"),
        "energy_method": energy.get("method"),
        "peak_bytes": memory.get(memory.get("compare_with", "peak_bytes")),
        "eval_loss": summary.eval.loss if summary.eval else None,
        "tokens_per_s": summary.tokens_per_s,
        "task_delta": task.delta if task is not None else None,
        "task_verdict": task.verdict_text if task is not None else None,
    }
    return {k: v for k, v in out.items() if v is not None}


class Trackers:
    """The trackers log.to names, open for one run (none: every call does nothing).

    Args:
        names: log.to.
        run_dir: the run directory (TensorBoard's files go to its ``tensorboard/``).
        name: the run's name in the dashboards.
        project: log.project (MLflow experiment, W&B and trackio project).
        config: the resolved config, recorded as the run's parameters.

    Raises:
        UserError: a tracker whose library is not installed, named with how to install it.
    """

    def __init__(self, names: Sequence[str], run_dir: Path, name: str, project: str, config: dict[str, Any]) -> None:
        self._open: list[Any] = []
        for tracker in names:
            module, package = _NEEDS[tracker]
            try:
                lib = importlib.import_module(module)
            except ImportError:
                raise UserError(f"log.to: {tracker} needs its library: pip install {package}") from None
            self._open.append(_BACKENDS[tracker](lib, run_dir, name, project, config))

    def log(self, record: dict[str, Any], step: int) -> None:
        """One metrics.jsonl record at ``step``."""
        values = numbers({k: v for k, v in record.items() if k != "step"})
        for tracker in self._open:
            tracker.log(values, step)

    def finish(self, summary: Any) -> None:
        """The summary's headline, then close every tracker."""
        figures = headline(summary)
        for tracker in self._open:
            tracker.finish(numbers(figures), {k: str(v) for k, v in figures.items() if isinstance(v, str)})
        self._open = []


class _TensorBoard:
    def __init__(self, lib: Any, run_dir: Path, name: str, project: str, config: dict[str, Any]) -> None:
        self.writer = lib.SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{config}\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, values: dict[str, float], labels: dict[str, str]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"summary/{key}", value, 0)
        for key, text in labels.items():
            self.writer.add_text(f"summary/{key}", text)
        self.writer.close()


class _MLflow:
    def __init__(self, lib: Any, run_dir: Path, name: str, project: str, config: dict[str, Any]) -> None:
        self.lib = lib
        lib.set_experiment(project)
        self.run = lib.start_run(run_name=name)
        params = flat(config)
        lib.log_params({k: params[k] for k in list(params)[:100]})  # MLflow's batch limit

    def log(self, values: dict[str, float], step: int) -> None:
        self.lib.log_metrics(values, step=step)

    def finish(self, values: dict[str, float], labels: dict[str, str]) -> None:
        self.lib.log_metrics({f"summary/{k}": v for k, v in values.items()})
        self.lib.set_tags(labels)
        self.lib.end_run()


class _WandB:
    def __init__(self, lib: Any, run_dir: Path, name: str, project: str, config: dict[str, Any]) -> None:
        self.run = lib.init(project=project, name=name, dir=str(run_dir), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, values: dict[str, float], labels: dict[str, str]) -> None:
        self.run.summary.update({**values, **labels})
        self.run.finish()


class _Trackio:
    def __init__(self, lib: Any, run_dir: Path, name: str, project: str, config: dict[str, Any]) -> None:
        self.lib = lib
        self.run = lib.init(project=project, name=name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.lib.log(values, step=step)

    def finish(self, values: dict[str, float], labels: dict[str, str]) -> None:
        self.lib.log({f"summary/{k}": v for k, v in values.items()})
        self.lib.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB, "trackio": _Trackio}
