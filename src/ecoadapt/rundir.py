"""The run directory: created only after every check has passed, written atomically.

``summary.json`` is written last (and also when a run fails, with ``status: failed``), so a
folder without one, or with a failed one, is never mistaken for a result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ecoadapt.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file, fsync and rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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


def create(path: Path, overwrite: bool) -> Path:
    """Create (or empty, with ``overwrite``) the run directory. Call only after all checks."""
    check_writable(path, overwrite)
    if path.is_dir() and overwrite:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed, so a killed run keeps every line it logged)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
