"""`ecoadapt evaluate`: the downstream task alone, on the base and on a run's adapted model.

For a run whose task failed, or that had none, or to try other task settings on a saved model:
the adapted backbone is read from the run directory, the task runs as :mod:`ecoadapt.task.downstream`
does for ``adapt``, and the result goes to ``task.json`` and the run's ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ecoadapt.config import RunConfig
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.measure.phases import Phases
from ecoadapt.model import pretrained
from ecoadapt.model.parallel import pick_device
from ecoadapt.results import rundir
from ecoadapt.results.summary import RunSummary
from ecoadapt.task import downstream


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
    if not folder.is_dir():
        raise UserError(f"output.dir: {folder} does not exist: run `ecoadapt adapt` with this config first")
    with rundir.locked(folder):  # a run still writing there, or a second evaluate, is refused
        _check_same_model(cfg, folder)
        adapted = downstream.adapted_backbone(cfg)
        tracker = EnergyTracker.for_config(cfg.measure, device.type, device.index, 0, say)
        with Phases(tracker).window("task") as window:
            result = downstream.compare(cfg, pretrained.load_tokenizer(cfg.model), adapted, device, tracker)
        assert window.energy is not None
        result["energy"] = window.energy.as_dict()
        storage.write_json(folder / "task.json", result)
        summary_path = folder / "summary.json"
        if summary_path.exists():
            summary = RunSummary.read(summary_path)
            summary.task = result
            summary.save(summary_path)
    return result


MODEL_SECTIONS = ("model", "lora")  # what decides which model the run folder holds


def _check_same_model(cfg: RunConfig, folder: Path) -> None:
    """The run folder's model is the one this config describes.

    Raises:
        UserError: its config.yaml names another model or adapter (the keys are named).
    """
    saved_path = folder / "config.yaml"
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"output.dir: {folder} holds no config.yaml: not a run folder of ecoadapt's") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{saved_path}: unreadable ({type(e).__name__})") from None
    now = cfg.to_dict()
    before = {k: (saved or {}).get(k, {}) for k in MODEL_SECTIONS} if isinstance(saved, dict) else {}
    changed = rundir.config_changes(before, {k: now[k] for k in MODEL_SECTIONS})
    if changed:
        raise UserError(
            f"output.dir: {folder} holds a model adapted with other settings ({', '.join(changed[:5])}); "
            "evaluate it with the config it was adapted with, or point output.dir at that run"
        )
