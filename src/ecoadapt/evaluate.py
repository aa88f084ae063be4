"""`ecoadapt evaluate`: the downstream task alone, on the base and on a run's adapted model.

For a run whose task failed, or that had none, or to try other task settings on a saved model:
the adapted backbone is read from the run directory, the task runs as :mod:`ecoadapt.downstream`
does for ``adapt``, and the result goes to ``task.json`` and the run's ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecoadapt import downstream, models, storage
from ecoadapt import summary as summary_mod
from ecoadapt.config import RunConfig
from ecoadapt.errors import UserError
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.parallel import pick_device
from ecoadapt.progress import say


def run(cfg: RunConfig) -> dict[str, Any]:
    """The task on the base and on the adapted model of ``cfg``'s run directory.

    Writes ``task.json`` there and fills the ``task`` field of its summary.json.

    Raises:
        UserError: no task configured, or the run directory holds no adapted model.
    """
    if not cfg.task.train:
        raise UserError("task.train: name the labelled training files of the downstream task")
    device = pick_device(cfg.train.device)
    folder = Path(cfg.output.dir)
    adapted = downstream.adapted_backbone(cfg)
    tracker = EnergyTracker.for_config(cfg.measure, device.type, device.index, 0, say)
    tracker.begin_window("task")
    result = downstream.compare(cfg, models.load_tokenizer(cfg.model), adapted, device, tracker)
    result["energy"] = tracker.end_window("task").as_dict()
    storage.write_json(folder / "task.json", result)
    summary_path = folder / "summary.json"
    if summary_path.exists():
        summary = summary_mod.read(summary_path)
        summary.task = result
        summary_mod.write(summary_path, summary)
    return result
