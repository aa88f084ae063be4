"""What a tokenization worker process runs: light on purpose.

Workers are started with ``spawn`` and import this module (and numpy, and ``tokenizers`` when
they unpickle the tokenizer's backend), not torch or transformers: each costs tens of MB of
memory instead of hundreds, and starts in well under a second.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split (stable across runs and machines)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# The tokenizer and settings of a worker process (set once by init_worker, so each task sends
# only its texts).
_WORKER: dict[str, Any] = {}


def worker_tokenizer(tokenizer: Any) -> Any:
    """What a worker tokenizes with: the fast tokenizer's Rust backend alone where there is one
    (workers then import only ``tokenizers``, not transformers and torch: about 250 MB less each,
    and no Python wrapper per call), with padding and truncation off as the wrapper sets them
    per call; else the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    encode = getattr(tokenizer, "encode_batch_fast", None) or getattr(tokenizer, "encode_batch", None)
    if encode is not None:  # a tokenizers.Tokenizer (encode_batch_fast skips the character offsets)
        return [e.ids for e in encode(texts, add_special_tokens=special)]
    return list(tokenizer(texts, add_special_tokens=special, truncation=False, verbose=False)["input_ids"])


def init_worker(
    tokenizer: Any, objective: str, eval_fraction: float, dtype: str, eos: int | None, in_process: bool = False
) -> None:
    """Set up tokenization (in a worker process, or in this one for a small corpus)."""
    if not in_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
        from ecoadapt.core.processes import die_with_parent

        die_with_parent()  # a run killed with SIGKILL (the OOM killer's way) takes its workers along
    _WORKER.update(
        tokenizer=tokenizer, objective=objective, eval_fraction=eval_fraction, dtype=np.dtype(dtype), eos=eos
    )


def tokenize_chunk(docs: list[tuple[str, str]]) -> dict[str, Any]:
    """One chunk's token ids per split: {"<split>": (ids bytes, per-document lengths), "bytes": n}.

    Args:
        docs: (text, the text whose hash decides its split) of each document or piece.
    """
    w = _WORKER
    texts = [text for text, _ in docs]
    ids = _encode(w["tokenizer"], texts, special=w["objective"] == "mlm")
    separator = w["eos"] if w["objective"] == "clm" else None
    out: dict[str, Any] = {"bytes": sum(len(t) for t in texts)}
    parts: dict[str, list[list[int]]] = {"train": [], "eval": []}
    for (_, key), doc_ids in zip(docs, ids, strict=True):
        parts["eval" if is_held_out(key, w["eval_fraction"]) else "train"].append(
            [*doc_ids, separator] if separator is not None else list(doc_ids)
        )
    for split, rows in parts.items():
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.concatenate([np.asarray(r, dtype=w["dtype"]) for r in rows]) if rows else np.zeros(0, w["dtype"])
        out[split] = (flat.tobytes(), lengths)
    return out
