"""From corpus files to packed token blocks, split, through the token store.

Documents are tokenized with the model's own tokenizer and concatenated into one stream per
split that is cut into blocks of ``max_seq_len`` tokens: no padding is ever trained on. For
causal LM each document is followed by EOS, and where the tokenizer begins every text with BOS
(Llama, Gemma) every block begins with it too, as the model was trained to read a window
(:func:`ecoadapt.data.store.block_start`); for masked LM each document keeps the tokenizer's own
[CLS] ... [SEP]. The last partial block is dropped (counted in ``dropped_tokens``).

The held-out split is by document, decided by a hash of the document's text, so it is the same
on every machine and in every order, and duplicate documents never land on both sides.

The tokens live in a memory-mapped store on disk (see :mod:`ecoadapt.data.store`), keyed by the
files' contents, the tokenizer, the objective and the split: a sweep, every sequence length and
every rank of a torchrun job tokenize the corpus once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoadapt.config import DataConfig
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.core.storage import cache_root
from ecoadapt.data import readers, store
from ecoadapt.data.store import MemmapBlocks
from ecoadapt.data.tokenize_worker import is_held_out

__all__ = ["TokenBlocks", "build", "cache_dir", "is_held_out"]


@dataclass
class TokenBlocks:
    """A tokenized, split corpus, read from its memory-mapped store.

    Attributes:
        train: the training blocks, (n_train_blocks, max_seq_len) when indexed.
        eval: the held-out blocks.
        stats: document and token counts, and whether the store was reused.
    """

    train: MemmapBlocks
    eval: MemmapBlocks
    stats: dict[str, Any]


def cache_dir(cfg: DataConfig) -> Path:
    """The folder of token stores: data.cache_dir, else tokens/ in ecoadapt's cache."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "tokens"


def build(cfg: DataConfig, tokenizer: Any, objective: str, base: Path | None = None) -> TokenBlocks:
    """Read, split, tokenize and pack the corpus named by ``cfg``, through the token store.

    Args:
        cfg: the data section.
        tokenizer: the model's tokenizer.
        objective: "clm" or "mlm".
        base: folder that relative corpus paths are read from first (the config's folder).

    Raises:
        UserError: missing or empty corpus, a bad record, an empty split, no room for the store.
    """
    sources = readers.resolve(cfg.train, base)
    key_parts = {
        "sources": [store.source_digest(s) for s in sources],
        "text_field": cfg.text_field,
        "json_key": cfg.json_key,
        "tokenizer": store.tokenizer_fingerprint(tokenizer),
        "objective": objective,
        "eval_fraction": cfg.eval_fraction,
        "bad_records": cfg.bad_records,
    }
    prep = store.Preparation(
        sources,
        tokenizer,
        objective,
        cfg.text_field,
        cfg.json_key,
        cfg.eval_fraction,
        cfg.bad_records,
        cfg.lock_timeout_s,
    )
    tokens = store.open_or_prepare(cache_dir(cfg), key_parts, prep, say)
    meta = tokens.meta
    _check_split(meta, cfg.eval_fraction)
    first = store.block_start(tokenizer, objective)
    train, held = tokens.blocks("train", cfg.max_seq_len, first), tokens.blocks("eval", cfg.max_seq_len, first)
    stats = {
        "sources": sources,
        "documents": meta["documents"],
        "documents_cut": meta.get("documents_cut", 0),  # longer than readers.PIECE_CHARS: stored in pieces
        "train_documents": meta["train_documents"],
        "eval_documents": meta["eval_documents"],
        "train_blocks": len(train),
        "eval_blocks": len(held),
        "train_tokens": len(train) * train.seq_len,
        "dropped_tokens": train.dropped_tokens + held.dropped_tokens,
        "token_dtype": meta["dtype"],
        "block_start": first,  # the BOS each causal-LM block starts with, or None
        "store": str(tokens.folder),
        "cache_key": meta["key"],
        "cache": tokens.cache,
        "bad_records": meta.get("bad_records", {"policy": cfg.bad_records, "skipped": 0, "examples": []}),
    }
    return TokenBlocks(train, held, stats)


def _check_split(meta: dict[str, Any], eval_fraction: float) -> None:
    """Both splits hold documents.

    Raises:
        UserError: one of them is empty, saying what helps (a one-document corpus: splitting it).
    """
    if meta["documents"] <= 1:
        raise UserError(
            f"data.train: the corpus is one document ({meta['documents']}), which is either trained on or held "
            "out, never both: split it into documents (one per line of a .txt, one record per line of a .jsonl)"
        )
    if not meta["eval_documents"]:
        raise UserError(
            f"data.eval_fraction = {eval_fraction}: no document of {meta['documents']} was held out; "
            "raise data.eval_fraction or add documents"
        )
    if not meta["train_documents"]:
        raise UserError(f"data.eval_fraction = {eval_fraction}: every document was held out; lower it")
