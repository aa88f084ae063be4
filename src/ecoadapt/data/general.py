"""General-domain text (``data.general_eval``): what adapting to a domain cost the model elsewhere.

Its documents go through the token store like the corpus, every one of them held out (nothing
of it is trained on), and at most ``data.eval_max_blocks`` blocks are evaluated before and after
training. A general document that is also a training document would measure the domain twice
and forgetting never: such an overlap is refused before training, by the hash of each document's
text. The check reads the training corpus once more (no tokenizing) and is remembered for the
pair of token stores, so a sweep or a rerun does not pay it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecoadapt.config import DataConfig
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.core.storage import atomic_write_text
from ecoadapt.data import readers, store

ALL_HELD_OUT = 1.0  # every general document is evaluated, none trained on
KEY = "data.general_eval"


@dataclass
class GeneralBlocks:
    """The general text's blocks, and what they came from.

    Attributes:
        blocks: int64 (n, data.max_seq_len) token blocks, at most data.eval_max_blocks of them.
        stats: sources, documents, blocks, tokens, the store's cache key.
    """

    blocks: torch.Tensor
    stats: dict[str, Any]


def build(
    cfg: DataConfig, tokenizer: Any, objective: str, base: Path | None, train_stats: dict[str, Any]
) -> GeneralBlocks | None:
    """The general text of ``cfg.general_eval`` as blocks (None when it is ``[]``).

    Args:
        cfg: the data section.
        tokenizer: the model's tokenizer.
        objective: "clm" or "mlm".
        base: the folder relative paths are read from first.
        train_stats: the training corpus's statistics (its sources and store key).

    Raises:
        UserError: a source that matches no file, holds no text, or shares a document with the
            training corpus (naming it).
    """
    if not cfg.general_eval:
        return None
    sources = readers.resolve(cfg.general_eval, base, KEY)
    text_field = cfg.general_text_field or cfg.text_field
    same = sorted(set(sources) & set(train_stats["sources"]))
    if same:
        raise UserError(f"{KEY}: {same[0]} is also in data.train; give general text the model does not train on")
    key_parts = {
        "sources": [store.source_digest(s) for s in sources],
        "text_field": text_field,
        "json_key": None,
        "tokenizer": store.tokenizer_fingerprint(tokenizer),
        "objective": objective,
        "eval_fraction": ALL_HELD_OUT,
        "bad_records": cfg.bad_records,
    }
    prep = store.Preparation(
        sources, tokenizer, objective, text_field, None, ALL_HELD_OUT, cfg.bad_records, cfg.lock_timeout_s
    )
    tokens = store.open_or_prepare(store_root(cfg), key_parts, prep, say)
    if not tokens.meta["eval_documents"]:
        raise UserError(f"{KEY}: {', '.join(sources)} holds no text")
    _check_no_overlap(cfg, sources, text_field, train_stats, tokens.meta["key"])
    first = store.block_start(tokenizer, objective)
    blocks = tokens.blocks("eval", cfg.max_seq_len, first)[: cfg.eval_max_blocks]  # a few blocks: read now
    stats = {
        "sources": sources,
        "documents": tokens.meta["eval_documents"],
        "blocks": int(blocks.shape[0]),
        "tokens": int(blocks.numel()),
        "cache_key": tokens.meta["key"],
    }
    return GeneralBlocks(blocks, stats)


def store_root(cfg: DataConfig) -> Path:
    """Where the general text's store goes: beside the corpus's."""
    from ecoadapt.data.corpus import cache_dir

    return cache_dir(cfg)


def _check_no_overlap(
    cfg: DataConfig, sources: list[str], text_field: str, train_stats: dict[str, Any], general_key: str
) -> None:
    """Refuse general documents that are training documents (remembered per pair of stores).

    Raises:
        UserError: naming the first shared document.
    """
    marker = store_root(cfg) / f"no-overlap-{train_stats['cache_key']}-{general_key}.json"
    if marker.is_file():
        return
    skip = readers.BadRecords("skip", "data.bad_records")  # the stores already applied the policy
    general: dict[bytes, str] = {}
    for source in sources:
        for doc in readers.read(source, text_field, None, skip):
            general.setdefault(_digest(doc.text), doc.text)
    for source in train_stats["sources"]:
        for doc in readers.read(source, cfg.text_field, cfg.json_key, skip):
            text = general.get(_digest(doc.text))
            if text is not None:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise UserError(
                    f"{KEY}: the document {shown!r} is also in the training corpus ({source}); general text "
                    "must be text the model does not train on (remove it from one of them)"
                )
    atomic_write_text(marker, json.dumps({"train": train_stats["cache_key"], "general": general_key}))


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
