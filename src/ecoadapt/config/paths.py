"""The config keys that name files or folders, and what is done to them once, on loading."""

from __future__ import annotations

import os
from typing import Any

# The keys that name files or folders: a leading ~ in them is the user's home, as in a shell.
PATH_KEYS = ("model.name_or_path", "data.train", "data.cache_dir", "task.train", "task.test", "output.dir")


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
