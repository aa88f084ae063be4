"""The run directory: created only after every check has passed, written atomically.

``summary.json`` is written last (and also when a run fails, with ``status: failed``), so a
folder without one, or with a failed one, is never mistaken for a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ecoadapt.core import locks, ownership
from ecoadapt.core.errors import UserError
from ecoadapt.core.storage import atomic_write_text, read_json, read_jsonl
from ecoadapt.results.summary import FINISHED

LOCK_FILE = ".ecoadapt-run.lock"  # held (flock) while a run uses the folder; names its process
CHECKPOINT_FILE = "checkpoint.pt"  # a run's resumable checkpoint, inside its run directory
EXPORTED = ("model", "adapter")  # saved through a temp folder (.model.tmp) and set aside as model.old
# Every entry a run may write into its folder, claimed in its manifest (core/ownership.py) when it
# takes the folder's lock, before any is created: what ecoadapt removes is what it recorded.
RUN_ENTRIES = (
    LOCK_FILE,
    "config.yaml",
    "summary.json",
    "metrics.jsonl",
    CHECKPOINT_FILE,
    "phases.json",
    "task.json",
    "task_seeds.jsonl",
    "harness.json",
    "harness.jsonl",
    ".task-backbone",
    "tensorboard",
    *EXPORTED,
    *(f"{name}.old" for name in EXPORTED),
    *(f".{name}.tmp" for name in EXPORTED),
)
# What run folders of ecoadapt 0.3 and before held (they had a marker, no manifest): the one list
# `ecoadapt adopt` accepts, when the user asks it to take such a folder over.
LEGACY_ENTRIES = frozenset(
    {
        ownership.LEGACY_MARKER,
        *RUN_ENTRIES,
        "report.md",
        "report.html",
        "results.csv",
        "compute.md",
        "compute.tex",
        "energy_vs_metric.png",
        "memory.png",
        "throughput.png",
    }
)


def check_location(path: Path, key: str = "output.dir") -> None:
    """Refuse output folders that no run may own, whatever they hold: the file system's root,
    the home folder, the current folder and a repository's root (a run writes into a folder of
    its own, which overwriting may empty).

    Raises:
        UserError: naming the folder and what to choose instead.
    """
    resolved = path.expanduser().resolve()
    forbidden = {Path("/"): "the file system's root", Path.home().resolve(): "your home folder"}
    forbidden[Path.cwd().resolve()] = "the current folder"
    what = forbidden.get(resolved)
    if what is None and (resolved / ".git").exists():
        what = "a repository's root"
    if what is not None:
        raise UserError(f"{key}: {path} is {what}; ecoadapt writes into a folder of its own, e.g. runs/my-run")
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}: {path} exists and is not a folder")


def check_writable(path: Path) -> None:
    """Refuse to start when ``path`` (or its nearest existing parent) cannot be written.

    Raises:
        UserError: naming the folder.
    """
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output.dir: {parent} is not writable; choose another output.dir")


# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("output.overwrite", "output.resume", "budget.", "parallel.timeout_s", "measure.idle_s")


@dataclass
class ResumePoint:
    """What the run directory holds for this run.

    Attributes:
        checkpoint: the checkpoint to resume from, or None to start from the beginning.
        restart: the folder holds an earlier attempt of this same run that never checkpointed
            (killed early), or output.overwrite was set: what ecoadapt wrote there is removed
            and the run starts again.
        after_training: the earlier attempt trained and saved its model (``phases.json``):
            only the task and the summary are left to do.
        finished: the same run (same config) has finished: nothing is left to do, and the
            same command run again says so and exits 0.
    """

    checkpoint: Path | None = None
    restart: bool = False
    after_training: bool = False
    finished: bool = False


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


def resume_point(
    path: Path, config_now: dict[str, Any], overwrite: bool, require: bool, check_lock: bool = True
) -> ResumePoint:
    """Decide, before anything is loaded, whether the run in ``path`` resumes, restarts or starts.

    Args:
        path: output.dir.
        config_now: this run's configuration (``RunConfig.to_dict()``).
        overwrite: output.overwrite: start afresh whatever ecoadapt wrote there.
        require: output.resume (``--resume``): a checkpoint must be there.
        check_lock: refuse a folder whose lock another process holds (False where this process
            holds it already, as rank 0 does while it decides, or where the caller is a peer
            rank of the job that holds it).

    Raises:
        UserError: the folder is not writable; holds a finished run, files ecoadapt did not
            write (or changed since), a run with another configuration (the keys are named);
            --resume without a checkpoint.
    """
    check_location(path)
    check_writable(path)
    holder = in_use_by(path) if check_lock else None
    if holder is not None:
        raise UserError(f"output.dir: {path} is in use by {holder}; wait for it, or choose another output.dir")
    survey = ownership.Folder(path).check_ours()
    empty = not [name for name in survey.own if name != LOCK_FILE]
    if empty or overwrite:
        if require:
            raise UserError(f"output.resume: {path} holds no checkpoint to resume from")
        return ResumePoint(restart=not empty)
    if not (path / "config.yaml").is_file():
        return ResumePoint(restart=True)  # ours, killed before it wrote its config: start again
    if _finished_or_refused(path, config_now):
        return ResumePoint(finished=True)
    if (path / "phases.json").is_file():
        return ResumePoint(after_training=True)
    checkpoint = path / CHECKPOINT_FILE
    if checkpoint.is_file():
        return ResumePoint(checkpoint=checkpoint)
    if require:
        raise UserError(f"output.resume: {path} holds no checkpoint (the run stopped before its first one)")
    return ResumePoint(restart=True)


def _finished_or_refused(path: Path, config_now: dict[str, Any]) -> bool:
    """Whether the same run has finished there; a run with another config is refused (an
    interrupted one resumes, and a finished one is reported, only with its own config).

    Raises:
        UserError: naming the keys that changed.
    """
    summary_file = path / "summary.json"
    status = None
    if summary_file.is_file():
        try:
            status = read_json(summary_file).get("status")
        except (OSError, ValueError, AttributeError):
            status = None
    saved_config = path / "config.yaml"
    try:
        before = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(
            f"{saved_config}: unreadable ({type(e).__name__}); --set output.overwrite=true to restart"
        ) from None
    changes = config_changes(before if isinstance(before, dict) else {}, config_now)
    if changes:
        shown = ", ".join(changes[:5]) + (" ..." if len(changes) > 5 else "")
        what = f"a finished run ({status})" if status in FINISHED else "an interrupted run"
        raise UserError(
            f"output.dir: {path} holds {what} with a different config ({shown}); rerun it with the same settings, "
            "choose another output.dir, or --set output.overwrite=true to start again"
        )
    return status in FINISHED


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


def create(path: Path, restart: bool) -> Path:
    """Create the run folder (or, with ``restart``, remove what an earlier attempt of ecoadapt
    recorded writing there, the lock kept). Call only after every check has passed, holding the
    folder's lock (:func:`locked`)."""
    check_location(path)
    folder = ownership.Folder(path)
    folder.check_ours()
    path.mkdir(parents=True, exist_ok=True)
    if restart:
        folder.remove(keep=[LOCK_FILE])
        folder.claim(*RUN_ENTRIES)  # claimed again: the restart writes them anew
    return path


def in_use_by(path: Path) -> str | None:
    """Who holds the run folder's lock now (None: nobody); the lock is not kept."""
    return locks.holder(path / LOCK_FILE)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the run folder's lock while a run uses it: what the run may write is claimed in the
    folder's manifest first, and sealed (fingerprinted) when the lock is released.

    Raises:
        UserError: the folder holds files ecoadapt did not write, or another live process holds
            its lock (named, with since when).
    """
    check_location(path)
    folder = ownership.Folder(path)
    folder.check_ours()
    folder.claim(*RUN_ENTRIES)
    # Sealed by the lock's holder only: a refused second run leaves the first's entries open.
    lock = locks.held(path / LOCK_FILE, f"output.dir: {path}", fix="wait for it, or choose another output.dir")
    with lock, folder.sealed_on_exit():
        yield
