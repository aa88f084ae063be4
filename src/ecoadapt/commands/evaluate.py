"""`ecoadapt evaluate`: the judges alone, on the base and on a run's adapted model.

For a run whose task failed, or that had none, or to try other task settings on a saved model:
the adapted weights are read from the run directory, the labelled task runs as
:mod:`ecoadapt.task.downstream` does for ``adapt`` and the harness as :mod:`ecoadapt.task.harness`
does, and the results go to ``task.json`` / ``harness.json`` and the run's ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ecoadapt.commands.finish import judge_in_window
from ecoadapt.config import RunConfig, paths
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.measure import environment
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.model import pretrained
from ecoadapt.model.parallel import pick_device
from ecoadapt.results import rundir
from ecoadapt.results.judged import Judgement
from ecoadapt.results.summary import RunSummary
from ecoadapt.task import downstream, harness


def judge(cfg: RunConfig, base: Path | None = None) -> Judgement:
    """The judges the config names (task.train, task.harness) on the base and on the adapted
    model of ``cfg``'s run directory.

    Writes ``task.json`` and ``harness.json`` there and fills the ``task`` and ``harness``
    fields of its summary.json.

    Args:
        cfg: the checked configuration.
        base: the config file's folder (relative task files are looked up there first).

    Returns:
        The task's result and the harness's (each None when the config does not name it).

    Raises:
        UserError: no judge configured, or the run directory holds no adapted model.
    """
    paths.anchor_task_files(cfg, base)
    environment.read_before_loading()
    if not cfg.task.judged:
        raise UserError(
            "task.train: name the labelled training files of the downstream task (or task.harness: harness tasks)"
        )
    device = pick_device(cfg.train.device)
    folder = Path(cfg.output.dir)
    if not folder.is_dir():
        raise UserError(f"output.dir: {folder} does not exist: run `ecoadapt adapt` with this config first")
    with rundir.locked(folder):  # a run still writing there, or a second evaluate, is refused
        _check_same_model(cfg, folder)
        if cfg.task.harness:
            harness.load_tasks(cfg.task, harness.specs(cfg.task))  # a bad task file: refused before loading a model
        adapted = downstream.adapted_backbone(cfg, whole=bool(cfg.task.harness))
        tokenizer = pretrained.load_tokenizer(cfg.model)
        tracker = EnergyTracker.for_config(cfg.measure, device.type, device.index, 0, say)
        found = Judgement()
        if cfg.task.train:
            found.task = judge_in_window(
                "task", tracker, lambda: downstream.compare(cfg, tokenizer, adapted, device, tracker)
            )
            storage.write_json(folder / "task.json", found.task.to_dict())
        if cfg.task.harness:
            found.harness = judge_in_window(
                "harness", tracker, lambda: harness.compare(cfg, tokenizer, adapted, device, tracker)
            )
            storage.write_json(folder / "harness.json", found.harness.to_dict())
        summary_path = folder / "summary.json"
        if summary_path.exists():
            summary = RunSummary.read(summary_path)
            summary.task = found.task or summary.task
            summary.harness = found.harness or summary.harness
            summary.save(summary_path)
    return found


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
