"""The run directory: created only after every check has passed, written atomically.

``summary.json`` is written last (and also when a run fails, with ``status: failed``), so a
folder without one, or with a failed one, is never mistaken for a result.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ecoadapt.core.errors import UserError
from ecoadapt.core.storage import atomic_write_text, read_json, read_jsonl
from ecoadapt.results.summary import FINISHED


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse to start when the run directory cannot be written or holds an earlier run.

    Raises:
        UserError: the folder exists and is not empty (without output.overwrite), or it (or the
            nearest existing parent) is not writable.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output.dir: {path} already holds files; choose another or --set output.overwrite=true")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output.dir: {parent} is not writable; choose another output.dir")


CHECKPOINT_FILE = "checkpoint.pt"  # a run's resumable checkpoint, inside its run directory
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("output.overwrite", "output.resume", "budget.", "parallel.timeout_s", "measure.idle_s")


@dataclass
class ResumePoint:
    """What the run directory holds for this run.

    Attributes:
        checkpoint: the checkpoint to resume from, or None to start from the beginning.
        restart: the folder holds an earlier attempt of this same run that never checkpointed
            (killed early): it is emptied and the run starts again.
    """

    checkpoint: Path | None = None
    restart: bool = False


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys whose values differ (``section.key``), ignoring those a resume may change."""
    a, b = _flatten(before), _flatten(now)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [k for k in changed if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)]


def resume_point(path: Path, config_now: dict[str, Any], overwrite: bool, require: bool) -> ResumePoint:
    """Decide, before anything is loaded, whether the run in ``path`` resumes, restarts or starts.

    Args:
        path: output.dir.
        config_now: this run's configuration (``RunConfig.to_dict()``).
        overwrite: output.overwrite: start afresh whatever the folder holds.
        require: output.resume (``--resume``): a checkpoint must be there.

    Raises:
        UserError: the folder is not writable; holds a finished run, files of something else,
            or a run with another configuration (the keys are named); --resume without a
            checkpoint.
    """
    if overwrite or not path.is_dir() or not any(path.iterdir()):
        check_writable(path, overwrite)
        if require:
            raise UserError(f"output.resume: {path} holds no checkpoint to resume from")
        return ResumePoint()
    saved_config = path / "config.yaml"
    if not saved_config.is_file():
        check_writable(path, overwrite)  # not a run directory: refuses, naming the fix
    check_writable(path, True)
    summary_file = path / "summary.json"
    status = None
    if summary_file.is_file():
        try:
            status = read_json(summary_file).get("status")
        except (OSError, ValueError, AttributeError):
            status = None
    if status in FINISHED:
        raise UserError(
            f"output.dir: {path} holds a finished run ({status}); choose another or --set output.overwrite=true"
        )
    try:
        before = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(
            f"{saved_config}: unreadable ({type(e).__name__}); --set output.overwrite=true to restart"
        ) from None
    changes = config_changes(before if isinstance(before, dict) else {}, config_now)
    if changes:
        shown = ", ".join(changes[:5]) + (" ..." if len(changes) > 5 else "")
        raise UserError(
            f"output.dir: {path} holds an interrupted run with a different config ({shown}); rerun it with the same "
            "settings to resume, choose another output.dir, or --set output.overwrite=true to restart"
        )
    checkpoint = path / CHECKPOINT_FILE
    if checkpoint.is_file():
        return ResumePoint(checkpoint=checkpoint)
    if require:
        raise UserError(f"output.resume: {path} holds no checkpoint (the run stopped before its first one)")
    return ResumePoint(restart=True)


def check_room(path: Path, needed_bytes: int, what: str) -> None:
    """Refuse to start when the disk holding ``path`` lacks ``needed_bytes`` free.

    Raises:
        UserError: naming the folder, the bytes free and needed, and ``what`` needs them.
    """
    parent = path
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise UserError(
            f"output.dir: {parent} has {free / 2**30:.2f} GiB free, {what} need about {needed_bytes / 2**30:.2f} GiB; "
            "free some space or choose another output.dir"
        )


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the records logged after ``last_step`` (a resumed run logs those steps again)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def create(path: Path, overwrite: bool) -> Path:
    """Create (or empty, with ``overwrite``) the run directory. Call only after all checks."""
    check_writable(path, overwrite)
    if path.is_dir() and overwrite:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
