"""The base model's task results, computed once and shared by every run that asks again.

Every point of a sweep, and every rerun, evaluates the same base model on the same task with
the same seeds: the result is kept in ``<cache>/task-base/`` under a key made of the model's
files, the task files' contents, every task setting that changes the result, the resolved
precision and device type, the seed, the versions of every library that shapes a score, and,
from a source tree, its commit and uncommitted changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ecoadapt.config import ModelConfig, RunConfig
from ecoadapt.core import storage
from ecoadapt.core.progress import say
from ecoadapt.data import readers
from ecoadapt.data.store import source_digest
from ecoadapt.measure.environment import package_version, source_revision
from ecoadapt.model import gguf_cache, pretrained

# Task settings that do not change a base result: which seeds run (each seed is its own entry),
# whether the cache is used, and where the files are (their contents are in the key instead).
NOT_IN_KEY = ("seeds", "cache", "train", "test")
SCORING_PACKAGES = ("ecoadapt", "torch", "transformers", "tokenizers", "peft", "safetensors", "numpy")

_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> digest, per process


def _digest(path: Path) -> str:
    """A file's or folder's content digest, remembered for the process while it is unchanged."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    stamp = (str(path), sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0))
    if stamp not in _digests:
        # A folder (a model): its files by name and contents; a file: its contents alone, so
        # the same examples under another name or folder give the same key.
        _digests[stamp] = source_digest(str(path)) if path.is_dir() else _file_contents(path)
    return _digests[stamp]


def file_digest(path: Path) -> str:
    """A file's content digest (remembered for the process while the file is unchanged)."""
    return _digest(path)


def _file_contents(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(cfg: ModelConfig) -> str:
    """What identifies the base model: its files' contents (a GGUF file alone)."""
    where, gguf_file, _ = pretrained.resolve_model(cfg, lean=False)
    if gguf_file:  # the file, and how ecoadapt reads it (its converted folder's format)
        return f"{_digest(Path(where) / gguf_file)}@gguf-format-{gguf_cache.FORMAT}"
    return _digest(Path(where))


def key(run: RunConfig, precision: str, device_type: str) -> str:
    """The base results' key for ``run``'s model and task (without the seed)."""
    task = {k: v for k, v in asdict(run.task).items() if k not in NOT_IN_KEY}
    parts = {
        "model": model_identity(run.model),
        "task": task,
        "files": {role: [_file_id(s) for s in readers.resolve(files)] for role, files in _roles(run).items()},
        "lora": asdict(run.lora) if run.task.lora else None,
        "precision": precision,
        "device": device_type,
        # Every library that shapes a score, and the very code when it runs from a source tree.
        "versions": [package_version(p) for p in SCORING_PACKAGES],
        "source": source_revision(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _roles(run: RunConfig) -> dict[str, list[str]]:
    return {"train": run.task.train, **({"test": run.task.test} if run.task.test else {})}


def _file_id(source: str) -> str:
    """A task file's contents (a builtin task or a hub dataset: as the store keys it)."""
    return source_digest(source) if source.startswith(("builtin:", "hf:")) else _digest(Path(source))


def _path(name: str) -> Path:
    return storage.cache_root() / "task-base" / f"{name}.json"


def load(cache_key: str, seed: int) -> dict[str, Any] | None:
    """The cached base result for ``seed``, or None (missing or unreadable: computed again)."""
    return load_named(f"{cache_key}-seed{seed}")


def store(cache_key: str, seed: int, result: dict[str, Any]) -> None:
    """Keep ``result`` (atomically: a reader never sees half a file)."""
    store_named(f"{cache_key}-seed{seed}", result)


def load_named(name: str) -> dict[str, Any] | None:
    """The cached base result called ``name`` (another judge's, such as the harness's), or None."""
    cached = storage.read_cache(_path(name), say)
    return dict(cached) if isinstance(cached, dict) else None


def store_named(name: str, result: dict[str, Any]) -> None:
    """Keep the base result called ``name``, atomically."""
    storage.write_json(_path(name), result)
