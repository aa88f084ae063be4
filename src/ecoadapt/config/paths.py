"""The config keys that name files or folders, and what is done to them once, on loading."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

# The keys that name files or folders: a leading ~ in them is the user's home, as in a shell.
PATH_KEYS = (
    "model.name_or_path",
    "data.train",
    "data.general_eval",
    "data.cache_dir",
    "task.train",
    "task.test",
    "task.harness",
    "output.dir",
)
# The task's files, read by the task (and in other processes: a sweep's point, `evaluate`) long
# after the config was read: anchored to the folder relative corpus paths are read from.
TASK_FILE_KEYS = ("train", "test", "harness")
NOT_FILES = ("builtin:", "hf:")


def expand_home(cfg: Any) -> None:
    """Expand ``~`` and ``~user`` in every path key of a RunConfig (a folder literally named ``~``
    is never meant)."""
    for dotted in PATH_KEYS:
        section_name, key = dotted.split(".")
        section = getattr(cfg, section_name)
        value = getattr(section, key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(section, key, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(
                section, key, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v for v in value]
            )


def anchor_task_files(cfg: Any, base: Path | None) -> None:
    """Look the task's relative files up as corpus files are: in ``base`` (the config file's
    folder, or a sweep's) first, else from the working folder. An entry found in ``base`` is
    rewritten to that path, so every later reader (the task, a resumed run, the base results'
    key) finds the same file; an entry that is not a file there (a harness task's name) is kept.
    """
    if base is None:
        return
    for key in TASK_FILE_KEYS:
        entries = getattr(cfg.task, key)
        anchored = []
        for entry in entries:
            if not entry.startswith(NOT_FILES) and not Path(entry).is_absolute():
                candidate = str(base / entry)
                if glob.glob(candidate, recursive=True):
                    entry = candidate
            anchored.append(entry)
        setattr(cfg.task, key, anchored)
