"""The token store: a corpus tokenized once into memory-mapped files, shared by every run.

Documents stream from the readers in chunks, are split by the hash of their text (held out or
not), tokenized by worker processes (one per core, the fast tokenizer's batch call) and appended
to flat files of token ids on disk (uint16 when the vocabulary fits, else uint32), with a
document index. Training reads blocks of any length straight from the memory map: nothing
proportional to the corpus lives in RAM, in any process.

One store per (files' contents, text field, tokenizer, objective, held-out fraction), in
``<cache>/tokens/<key>/``; the block length is cut at read time, so every sequence length,
sweep point and torchrun rank reuses it. A file lock makes one process prepare it while the
others wait; preparation writes into a temporary folder renamed into place when complete, so an
interrupted preparation leaves nothing a later run trusts (the next one starts clean).
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecoadapt.core import locks
from ecoadapt.core.errors import UserError
from ecoadapt.core.storage import atomic_write_text, fsync
from ecoadapt.data import builtin, hub_datasets, readers
from ecoadapt.data.tokenize_worker import init_worker, tokenize_chunk, worker_tokenizer

STORE_FORMAT = (
    2  # 2: long documents in pieces, checksums. Bump when the layout changes: stores of another format are not read
)
# A tokenization task holds at most this many documents or characters: batches large enough for
# the tokenizer, and a worker's transient memory (token ids as Python lists, ~40 B a token) bounded.
CHUNK_DOCS = 2048
CHUNK_CHARS = 2 * 2**20
IN_FLIGHT_PER_WORKER = 4  # chunks read ahead per worker: enough to keep it busy, memory bounded
WORKERS_FROM_BYTES = 32 * 2**20  # below this much text, tokenize in-process (workers take seconds to start)
SPLITS = ("train", "eval")


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


def source_digest(source: str) -> str:
    """What identifies a source's contents: a hash of its bytes (every file of a folder)."""
    if source.startswith(builtin.PREFIX):
        return builtin.digest(source)
    if hub_datasets.is_hub(source):
        return hub_datasets.digest(source)
    path = Path(source)
    h = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            h.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 when every id fits, else uint32: 2 or 4 bytes per token on disk."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class MemmapBlocks:
    """Blocks of ``seq_len`` tokens read from a memory-mapped token file.

    Indexing (an int, a slice, a list or tensor of indices) returns int64 tensors, (k, seq_len)
    (or (seq_len,) for an int); only the rows asked for are read. With ``first``, each block is
    that token followed by the stream's next ``seq_len - 1`` tokens. A stream shorter than one
    block is one short block, so a tiny corpus still trains; the tokens after the last full
    block are dropped (``dropped_tokens``).
    """

    def __init__(self, path: Path, dtype: np.dtype[Any], seq_len: int, first: int | None = None) -> None:
        size = path.stat().st_size // dtype.itemsize
        stream = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        cut = seq_len - 1 if first is not None else seq_len  # the stream's tokens in each block
        n = size // cut
        width = cut if n else size
        self.rows = stream[: n * cut].reshape(n, cut) if n else stream.reshape(1 if size else 0, width)
        self.dropped_tokens = size - n * cut if n else 0
        self.first = first
        self.seq_len = width + (first is not None)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(blocks, tokens per block)."""
        return len(self), self.seq_len

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        rows = torch.from_numpy(np.asarray(self.rows[index], dtype=np.int64))
        if self.first is None:
            return rows
        start = torch.full((*rows.shape[:-1], 1), self.first, dtype=torch.int64)
        return torch.cat([start, rows], dim=-1)


@dataclass
class TokenStore:
    """A prepared corpus on disk.

    Attributes:
        folder: the store's folder.
        meta: counts, dtype and provenance (meta.json).
        cache: "hit" (reused) or "miss" (prepared by this call).
    """

    folder: Path
    meta: dict[str, Any]
    cache: str

    def blocks(self, split: str, seq_len: int, first: int | None = None) -> MemmapBlocks:
        """The ``split`` ("train" or "eval") in blocks of ``seq_len`` tokens, each starting with the
        token ``first`` when given (see :func:`block_start`)."""
        return MemmapBlocks(self.folder / f"{split}.bin", np.dtype(self.meta["dtype"]), seq_len, first)


def block_start(tokenizer: Any, objective: str) -> int | None:
    """The token every causal-LM block starts with: the tokenizer's BOS, when it begins every
    text with one (Llama, Gemma, Mistral: models trained that way read a window without it
    badly, Gemma 3 270M's loss on general English 5.28 nats without it against 3.32 with it);
    None for masked LM and for tokenizers that add none (GPT-2, SmolLM2). Blocks are cut from
    the documents' stream, so most begin mid-document: the BOS is what the model was trained to
    see at position 0, not a document boundary."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if objective != "clm" or bos is None:
        return None
    ids = tokenizer("a").input_ids
    return int(bos) if ids and ids[0] == bos else None


DATA_FILES = tuple(f"{split}.{kind}" for split in SPLITS for kind in ("bin", "docs"))
CHECK_WINDOWS, CHECK_WINDOW_BYTES = 32, 64 * 2**10  # what a store's checksum reads: 2 MiB a file at most


def sampled_checksum(path: Path) -> str:
    """CRC-32 of a file's size and of CHECK_WINDOWS windows spread evenly over it (the whole file
    when smaller): a store of gigabytes is checked in milliseconds at every start, and a file of
    the right size that is not what was written (zeros after a power cut) does not pass."""
    size = path.stat().st_size
    crc = zlib.crc32(str(size).encode())
    with open(path, "rb") as f:
        if size <= CHECK_WINDOWS * CHECK_WINDOW_BYTES:
            return f"{zlib.crc32(f.read(), crc):08x}"
        step = (size - CHECK_WINDOW_BYTES) // (CHECK_WINDOWS - 1)
        for i in range(CHECK_WINDOWS):
            f.seek(i * step)
            crc = zlib.crc32(f.read(CHECK_WINDOW_BYTES), crc)
    return f"{crc:08x}"


def open_store(folder: Path) -> TokenStore | None:
    """The complete store in ``folder``, or None (absent, of another format, or damaged: a size
    or a checksum that is not what was written)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != STORE_FORMAT:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            if (folder / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * itemsize:
                return None
        if any(sampled_checksum(folder / name) != meta["checksums"][name] for name in DATA_FILES):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenStore(folder, meta, "hit")


@dataclass
class Preparation:
    """What a store is prepared from.

    Attributes:
        sources: the resolved corpus files and folders.
        tokenizer: the model's tokenizer.
        objective: "clm" (EOS after each document) or "mlm" (the tokenizer's [CLS] ... [SEP]).
        text_field: record field holding the text.
        json_key: where a .json file holds its records.
        eval_fraction: the share of documents held out, by the hash of their text.
        bad_records: "error" or "skip" (see readers.BadRecords).
        lock_wait_s: how long to wait for another process preparing the same store (s).
    """

    sources: list[str]
    tokenizer: Any
    objective: str
    text_field: str
    json_key: str | None
    eval_fraction: float
    bad_records: str = "error"
    lock_wait_s: float = 3600.0


def open_or_prepare(root: Path, key_parts: dict[str, Any], prep: Preparation, say: Callable[[str], None]) -> TokenStore:
    """The store for these sources and settings: reused when complete, else prepared (once,
    whichever process gets the lock first).

    Raises:
        UserError: the cache folder cannot be written or lacks room; a bad record; no text.
    """
    key = hashlib.sha256(json.dumps({"format": STORE_FORMAT, **key_parts}, sort_keys=True).encode()).hexdigest()[:32]
    folder = root / key
    store = open_store(folder)
    if store is not None:
        return store
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"data.cache_dir: cannot create {root} ({e.strerror}); set data.cache_dir to a writable folder"
        ) from None
    what, fix = f"the token store {folder}", "raise data.lock_timeout_s, or wait for it"
    with locks.held(root / f"{key}.lock", what, prep.lock_wait_s, say, fix):
        store = open_store(folder)  # another process may have prepared it meanwhile
        if store is not None:
            return store
        for stale in root.glob(f".{key}.*.tmp"):  # an interrupted preparation: never trusted
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)  # incomplete or damaged
        _check_room(root, prep.sources, token_dtype(len(prep.tokenizer)))
        tmp = root / f".{key}.{os.getpid()}.tmp"
        tmp.mkdir()
        try:
            meta = _prepare(tmp, prep, say)
            for name in DATA_FILES:  # on disk before anything says the store is complete
                fsync(tmp / name)
            checksums = {name: sampled_checksum(tmp / name) for name in DATA_FILES}
            meta.update({"format": STORE_FORMAT, "key": key, "sources": prep.sources, "checksums": checksums})
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))  # written last: the store is complete
            os.replace(tmp, folder)
            fsync(root)  # the rename, too, survives a power cut
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return TokenStore(folder, meta, "miss")


def _check_room(root: Path, sources: list[str], dtype: np.dtype[Any]) -> None:
    """Refuse to start when the store would not fit the disk: about one token per two bytes of
    text (four for compressed files), ``dtype.itemsize`` bytes a token, plus the document index."""
    text_bytes = 0
    for s in sources:
        if s.startswith(builtin.PREFIX) or hub_datasets.is_hub(s):  # no file here to size (hub: cached already)
            continue
        path = Path(s)
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        size = sum(f.stat().st_size for f in files)
        text_bytes += size * 4 if readers.file_format(path)[1] else size
    needed = text_bytes // 2 * dtype.itemsize + 64 * 2**20
    free = shutil.disk_usage(root).free
    if free < needed:
        raise UserError(
            f"data.cache_dir: {root} has {free / 2**30:.2f} GiB free; the tokenized corpus needs about "
            f"{needed / 2**30:.2f} GiB; free some space or set data.cache_dir to a larger disk"
        )


def _documents(
    sources: list[str], text_field: str, json_key: str | None, bad: readers.BadRecords, counts: dict[str, int]
) -> Iterator[tuple[str, str]]:
    """(text, what decides its split) of every document, long ones in pieces (counted)."""
    for source in sources:
        for doc in readers.read(source, text_field, json_key, bad):
            if doc.piece:
                counts["documents_cut"] += doc.piece == 1
                counts["pieces_after_first"] += 1
            yield doc.text, doc.key


def _chunks(docs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    chunk: list[tuple[str, str]] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc[0])
        if len(chunk) == CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _prepare(folder: Path, prep: Preparation, say: Callable[[str], None]) -> dict[str, Any]:
    """Stream, split, tokenize and write the store's files into ``folder``; returns its counts."""
    sources, tokenizer, objective = prep.sources, prep.tokenizer, prep.objective
    from tqdm import tqdm

    if objective == "clm" and tokenizer.eos_token_id is None:
        raise UserError("model: the tokenizer has no EOS token, which causal-LM packing needs")
    dtype = token_dtype(len(tokenizer))
    total_bytes = _text_bytes_hint(sources)
    workers = os.cpu_count() or 1
    use_pool = workers > 1 and (total_bytes is None or total_bytes >= WORKERS_FROM_BYTES)
    init = (worker_tokenizer(tokenizer), objective, prep.eval_fraction, dtype.str, tokenizer.eos_token_id)
    counts = {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "documents")}
    cut = {"documents_cut": 0, "pieces_after_first": 0}
    bad = readers.BadRecords(prep.bad_records, "data.bad_records")
    files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115
    index = {s: open(folder / f"{s}.docs", "wb") for s in SPLITS}  # noqa: SIM115
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr, mininterval=2.0)
    start = time.perf_counter()
    try:
        if use_pool:
            chunks = _chunks(_documents(sources, prep.text_field, prep.json_key, bad, cut))
            _write(_tokenized_in_workers(chunks, workers, init), files, index, counts, bar)
        else:
            init_worker(*init, in_process=True)
            chunks = _chunks(_documents(sources, prep.text_field, prep.json_key, bad, cut))
            _write(map(tokenize_chunk, chunks), files, index, counts, bar)
    finally:
        bar.close()
        for f in (*files.values(), *index.values()):
            f.close()
    documents = counts["train_documents"] + counts["eval_documents"] - cut["pieces_after_first"]
    if not documents:
        raise UserError(f"data.train: {', '.join(sources)} holds no text (all files are empty?)")
    seconds = time.perf_counter() - start
    tokens = counts["train_tokens"] + counts["eval_tokens"]
    rate = tokens / max(seconds, 1e-9)
    say(f"tokenized {documents:,} documents, {tokens:,} tokens in {seconds:.0f} s ({rate:,.0f} tokens/s)")
    if bad.skipped:
        say(f"data.bad_records: skipped {bad.skipped:,} records that held no usable text ({bad.examples[0]})")
    return {
        **counts,
        "documents": documents,
        # Documents longer than readers.PIECE_CHARS, each stored as several pieces.
        "documents_cut": cut["documents_cut"],
        "dtype": dtype.str,
        "vocab_size": len(tokenizer),
        "seconds": seconds,
        "bad_records": bad.summary(),
    }


def _tokenized_in_workers(
    chunks: Iterator[list[tuple[str, str]]], workers: int, init: tuple[Any, ...]
) -> Iterator[dict[str, Any]]:
    """Each chunk tokenized in a worker process, in order, with at most IN_FLIGHT_PER_WORKER
    chunks per worker read ahead (nothing proportional to the corpus is held).

    Raises:
        UserError: a worker died (the kernel's OOM killer, a signal): noticed within moments,
            naming how it died; the caller keeps nothing of the preparation.
    """
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    pending: collections.deque[Future[dict[str, Any]]] = collections.deque()
    seen: dict[int, Any] = {}  # worker processes, kept to read how one ended
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=init)
    try:
        for chunk in chunks:
            pending.append(pool.submit(tokenize_chunk, chunk))
            seen.update(getattr(pool, "_processes", None) or {})
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except (BrokenProcessPool, ValueError, OSError) as e:
        # A submit racing the pool's breakage spawns a worker with pipes the pool has just
        # closed ("bad value(s) in fds_to_keep"): the same death, seen from the other side.
        if not isinstance(e, BrokenProcessPool) and not getattr(pool, "_broken", False):
            raise
        seen.update(getattr(pool, "_processes", None) or {})
        how = _how_workers_died(seen.values())
        # A worker spawned while the pool broke escapes the pool's own SIGTERM, takes queued work
        # and blocks forever writing its result to a queue nobody reads; shutdown would wait on
        # it (seen: 7 hangs in 20 kills at the pool's start). Nothing a worker holds is worth
        # keeping, so every one still alive is killed before the pool is shut down.
        for proc in seen.values():
            if proc.is_alive():
                proc.kill()
        raise UserError(f"tokenizing: {how}; nothing of it was kept") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error downstream: no work left queued


def _settled_exit_codes(processes: list[Any], within_s: float = 3.0) -> list[int | None]:
    """The workers' exit codes once they have been reaped, waiting ``within_s`` at most.

    The pool's manager thread joins its broken workers while this thread asks: both call
    ``waitpid`` on the same child, and the one that loses reads None (seen here one time in
    three) although the status arrives on the shared process object a moment later. A worker
    that is still alive after the wait (one spawned as the pool broke) reads None.
    """
    deadline = time.monotonic() + within_s
    for proc in processes:
        join = getattr(proc, "join", None)
        if join is not None:
            join(timeout=max(0.0, deadline - time.monotonic()))
    codes = [getattr(proc, "exitcode", None) for proc in processes]
    while None in codes and time.monotonic() < deadline:
        time.sleep(0.01)
        codes = [getattr(proc, "exitcode", None) for proc in processes]
    return codes


def _how_workers_died(processes: Iterable[Any]) -> str:
    """A dead tokenization worker, in words: the signal that ended it and its likely cause.

    A SIGKILL is named before anything else: the pool answers one dead worker by sending SIGTERM
    to the others, which is the consequence, not the cause.
    """
    codes = _settled_exit_codes(list(processes))
    for code in sorted(codes, key=lambda c: c != -signal.SIGKILL):
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            cause = (
                ": most likely the system ran out of memory (the kernel's OOM killer); free memory, or "
                "split very long documents"
                if -code == signal.SIGKILL
                else ""
            )
            return f"a worker process was killed by {name}{cause}"
        if code not in (None, 0):
            return f"a worker process exited with status {code}"
    return "a worker process ended abruptly"


def _write(
    results: Iterable[dict[str, Any]],
    files: dict[str, Any],
    index: dict[str, Any],
    counts: dict[str, int],
    bar: Any,
) -> None:
    """Append each chunk's tokens and document end offsets, in order."""
    for chunk in results:
        for split in SPLITS:
            data, lengths = chunk[split]
            files[split].write(data)
            ends = counts[f"{split}_tokens"] + np.cumsum(lengths)
            index[split].write(ends.astype(np.int64).tobytes())
            counts[f"{split}_tokens"] += int(lengths.sum())
            counts[f"{split}_documents"] += len(lengths)
        bar.update(chunk["bytes"])
        documents = counts["train_documents"] + counts["eval_documents"]
        tokens = counts["train_tokens"] + counts["eval_tokens"]
        bar.set_postfix(docs=f"{documents:,}", tokens=f"{tokens:,}", refresh=False)


def _text_bytes_hint(sources: list[str]) -> int | None:
    """The bytes of text to read, for the progress bar (None when a source cannot say)."""
    total = 0
    for s in sources:
        path = builtin.shipped_file(s) if s.startswith(builtin.PREFIX) else Path(s)
        if path is None or hub_datasets.is_hub(s) or path.is_dir() or readers.file_format(path)[1]:
            return None
        total += path.stat().st_size
    return total
