"""Corpora from the Hugging Face hub, by the rules models follow: ``hf:ORG/NAME`` in data.train.

Resolved through ``datasets``' own cache (``~/.cache/huggingface``, or ``HF_HOME``): read from
there when cached, downloaded once when online, never fetched under ``HF_HUB_OFFLINE=1``. The
set is memory-mapped Arrow on disk, and its rows are read in batches into the token store, so a
corpus larger than memory streams through without being loaded whole.

Syntax: ``hf:ORG/NAME`` (split ``train``), with any of ``?config=NAME``, ``&split=SPLIT``
(``test``, ``train[:10%]``) and ``&revision=COMMIT_OR_BRANCH``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from ecoadapt.core.errors import UserError, first_line

PREFIX = "hf:"
KEYS = ("config", "split", "revision")
ROWS_PER_READ = 1024  # rows read from the Arrow files at a time: a bounded slice of the set


@dataclass(frozen=True)
class HubDataset:
    """One ``hf:`` source: a dataset repository, its configuration, split and revision."""

    repo_id: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None

    def how_to_fetch(self) -> str:
        args = [repr(self.repo_id), *([repr(self.config)] if self.config else []), f"split={self.split!r}"]
        if self.revision:
            args.append(f"revision={self.revision!r}")
        return (
            f'python -c "import datasets; datasets.load_dataset({", ".join(args)})" on a machine that is online '
            "(then copy ~/.cache/huggingface, or set HF_HOME, on this one)"
        )


def is_hub(source: str) -> bool:
    return source.startswith(PREFIX)


def parse(source: str) -> HubDataset:
    """``hf:ORG/NAME?config=...&split=...&revision=...`` as a :class:`HubDataset`.

    Raises:
        UserError: not a dataset id, or an unknown or repeated option.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, query = source[len(PREFIX) :].partition("?")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"data.train: '{source}': '{repo_id}' is not a hub dataset id (ORG/NAME); "
            "write hf:ORG/NAME, optionally ?config=NAME&split=SPLIT&revision=REV"
        ) from None
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in KEYS or key in options or not value:
            raise UserError(f"data.train: '{source}': option '{key}' is unknown, repeated or empty; known: {KEYS}")
        options[key] = value
    return HubDataset(repo_id, options.get("config"), options.get("split", "train"), options.get("revision"))


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE = ("1", "ON", "YES", "TRUE")


def offline_now() -> bool:
    """Whether the environment says, now, that the hub must not be contacted."""
    return any(os.environ.get(name, "").upper() in TRUE for name in OFFLINE_VARIABLES)


@contextlib.contextmanager
def honour_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` as the environment says now, for datasets and the hub client alike.

    Both read the variable once, when they are imported: a process that sets it afterwards (a
    notebook, a test session, a script that imported datasets first) would still reach for the
    hub, retrying with back-off, instead of reading the cache alone. Nothing changes when the
    environment says online.
    """
    if not offline_now():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    before = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


@functools.lru_cache(maxsize=8)
def load(source: str) -> Any:
    """The ``datasets.Dataset`` of ``source`` (memory-mapped from the cache; downloaded once).

    Raises:
        UserError: datasets is not installed; the set is not cached and the hub may not be
            contacted or cannot be reached; no such set, configuration or split.
    """
    ref = parse(source)
    if importlib.util.find_spec("datasets") is None:
        raise UserError(f"data.train: {source} needs the datasets library: pip install 'ecoadapt[hub-data]'")
    import datasets

    try:
        with honour_offline():
            return datasets.load_dataset(ref.repo_id, ref.config, split=ref.split, revision=ref.revision)
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE=1) or unreachable, and not cached
        raise UserError(
            f"data.train: {source} is not in the local datasets cache and the hub could not be used "
            f"({first_line(e)}). Fetch it beforehand: {ref.how_to_fetch()}"
        ) from None
    except (FileNotFoundError, ValueError) as e:  # no such dataset, configuration or split
        raise UserError(f"data.train: {source} cannot be loaded: {first_line(e)}") from None


def records(source: str, text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) of each row, read ``ROWS_PER_READ`` rows at a time; only ``text_field``
    is read from the files.

    Raises:
        UserError: the set has no column ``text_field`` (its columns named).
    """
    dataset = load(source)
    if text_field not in dataset.column_names:
        raise UserError(
            f"data.text_field: {source} has no column '{text_field}'; its columns: {', '.join(dataset.column_names)}"
        )
    row = 0
    for batch in dataset.select_columns([text_field]).iter(batch_size=ROWS_PER_READ):
        for value in batch[text_field]:
            yield f"{source}: row {row}", {text_field: value}
            row += 1


def digest(source: str) -> str:
    """What identifies the set's contents: its source and the fingerprint ``datasets`` gives
    the cached files (a new revision or other files give another)."""
    return hashlib.sha256(f"{source}|{load(source)._fingerprint}".encode()).hexdigest()
