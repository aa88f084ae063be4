"""From corpus files to packed token blocks, split and cached.

Documents are tokenized with the model's own tokenizer and concatenated into one stream that is
cut into blocks of ``max_seq_len`` tokens: no padding is ever trained on. For causal LM each
document is followed by EOS; for masked LM each keeps the tokenizer's own [CLS] ... [SEP]. The
last partial block is dropped (counted in ``dropped_tokens``).

The held-out split is by document, decided by a hash of the document's text, so it is the same
on every machine and in every order, and duplicate documents never land on both sides.

The result is cached under a key of file contents + tokenizer + sequence length + objective +
split, so a sweep tokenizes its corpus once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ecoadapt.config import DataConfig
from ecoadapt.data import builtin, readers
from ecoadapt.errors import UserError
from ecoadapt.storage import atomic_write, atomic_write_text, cache_root

CACHE_FORMAT = 1  # bump when the block layout changes, so stale caches are ignored


@dataclass
class TokenBlocks:
    """A tokenized, split corpus.

    Attributes:
        train: int64 tensor (n_train_blocks, max_seq_len) of token ids.
        eval: int64 tensor (n_eval_blocks, max_seq_len) of token ids.
        stats: document and token counts, and whether the cache was used.
    """

    train: torch.Tensor
    eval: torch.Tensor
    stats: dict[str, Any]


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split (stable across runs and machines)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the tokenizer's output."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)).encode())
    return h.hexdigest()


def pack(docs: list[list[int]], block_len: int, separator: int | None) -> tuple[torch.Tensor, int]:
    """Concatenate token lists (each followed by ``separator`` if given) into full blocks.

    Returns:
        (blocks of shape (n, block_len), number of tokens dropped from the last partial block).
        When the stream is shorter than one block, that one short block is returned whole.
    """
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
    if not stream:
        return torch.empty((0, block_len), dtype=torch.long), 0
    if len(stream) < block_len:
        return torch.tensor([stream], dtype=torch.long), 0
    n = len(stream) // block_len
    dropped = len(stream) - n * block_len
    return torch.tensor(stream[: n * block_len], dtype=torch.long).view(n, block_len), dropped


def tokenize(texts: list[str], tokenizer: Any, objective: str) -> list[list[int]]:
    """Token ids per document: with [CLS]/[SEP] for masked LM, bare for causal LM."""
    if not texts:
        return []
    # Long documents are cut into blocks later; the tokenizer's length warning does not apply.
    out = tokenizer(texts, add_special_tokens=objective == "mlm", truncation=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def _source_digest(source: str) -> str:
    if source.startswith(builtin.PREFIX):
        return f"{source}@python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    h = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(cfg: DataConfig) -> Path:
    """The folder of tokenized-corpus caches: data.cache_dir, else tokens/ in ecoadapt's cache."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "tokens"


def build(cfg: DataConfig, tokenizer: Any, objective: str, base: Path | None = None) -> TokenBlocks:
    """Read, split, tokenize and pack the corpus named by ``cfg``, through the cache.

    Args:
        cfg: the data section.
        tokenizer: the model's tokenizer.
        objective: "clm" or "mlm".
        base: folder that relative corpus paths are read from first (the config's folder).

    Raises:
        UserError: missing or empty corpus, a bad record, or an empty split.
    """
    sources = readers.resolve(cfg.train, base)
    key_parts = {
        "format": CACHE_FORMAT,
        "sources": [_source_digest(s) for s in sources],
        "text_field": cfg.text_field,
        "json_key": cfg.json_key,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": cfg.max_seq_len,
        "objective": objective,
        "eval_fraction": cfg.eval_fraction,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir(cfg) / f"{key}.safetensors"
    if path.exists():
        try:
            tensors = load_file(str(path))
            stats = json.loads(path.with_suffix(".json").read_text())
            stats["cache"] = "hit"
            return TokenBlocks(tensors["train"], tensors["eval"], stats)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass

    docs = readers.read_all(sources, cfg.text_field, cfg.json_key)
    train_texts = [d.text for d in docs if not is_held_out(d.text, cfg.eval_fraction)]
    eval_texts = [d.text for d in docs if is_held_out(d.text, cfg.eval_fraction)]
    if not eval_texts:
        raise UserError(
            f"data.eval_fraction = {cfg.eval_fraction}: no document of {len(docs)} was held out; "
            "raise data.eval_fraction or add documents"
        )
    if not train_texts:
        raise UserError(f"data.eval_fraction = {cfg.eval_fraction}: every document was held out; lower it")
    separator = tokenizer.eos_token_id if objective == "clm" else None
    if objective == "clm" and separator is None:
        raise UserError("model: the tokenizer has no EOS token, which causal-LM packing needs")
    train_ids = tokenize(train_texts, tokenizer, objective)
    eval_ids = tokenize(eval_texts, tokenizer, objective)
    train, dropped_train = pack(train_ids, cfg.max_seq_len, separator)
    held, dropped_eval = pack(eval_ids, cfg.max_seq_len, separator)
    stats = {
        "sources": sources,
        "documents": len(docs),
        "train_documents": len(train_texts),
        "eval_documents": len(eval_texts),
        "train_blocks": int(train.shape[0]),
        "eval_blocks": int(held.shape[0]),
        "train_tokens": int(train.numel()),
        "dropped_tokens": dropped_train + dropped_eval,
        "cache_key": key,
    }
    _write_cache(path, {"train": train, "eval": held}, stats)
    stats["cache"] = "miss"
    return TokenBlocks(train, held, stats)


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
    """Write the blocks and their statistics atomically: a killed run never leaves a torn cache.

    The statistics go first: blocks without them are never read, statistics without blocks are
    a miss.
    """
    with contextlib.suppress(OSError):  # the cache is an optimisation: unwritable only costs time
        atomic_write_text(path.with_suffix(".json"), json.dumps(stats))
        data = save({k: v.contiguous() for k, v in tensors.items()})
        atomic_write(path, lambda f: f.write(data))
