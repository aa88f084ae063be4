"""The token store: formats, streaming under a memory limit, interrupted and concurrent preparation."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from ecoadapt.config import DataConfig, TaskConfig
from ecoadapt.data import corpus, labelled, readers
from helpers.tiny_models import sentences

HELPER = Path(__file__).parent / "helpers" / "build_store.py"


def texts(path, **kw):
    return [d.text for d in readers.read(str(path), **kw)]


@pytest.fixture
def records(tmp_path):
    docs = sentences(60, seed=5)
    return [{"text": d, "label": ["a", "b", "c"][i % 3]} for i, d in enumerate(docs)]


def test_every_format_reads_the_same_documents_as_its_plain_equivalent(tmp_path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    docs = [r["text"] for r in records]
    txt = "\n".join(docs) + "\n"
    jsonl = "".join(json.dumps(r) + "\n" for r in records)
    csv_text = "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in records)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(txt.encode()))
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(txt.encode()))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(csv_text.encode()))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet", row_group_size=7)  # several groups
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.txt.gz", "a.txt.zst", "a.jsonl.gz", "a.jsonl.zst", "a.csv.gz", "a.parquet", "saved"):
        (source,) = readers.resolve([str(tmp_path / name)])
        assert texts(source) == docs, name
    # The same for a task's labelled examples.
    task = TaskConfig(text_field="text", label_field="label")
    plain = [(e.text, e.label) for e in labelled.read([str(tmp_path / "a.jsonl.gz")], task)]
    for name in ("a.parquet", "saved", "a.jsonl.zst", "a.csv.gz"):
        assert [(e.text, e.label) for e in labelled.read([str(tmp_path / name)], task)] == plain, name
    assert plain[0] == (docs[0], "a")


def test_format_errors_name_the_file_and_what_to_do(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "a.parquet")
    with pytest.raises(Exception, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        texts(tmp_path / "a.parquet")
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(b"[]"))
    with pytest.raises(Exception, match=r"json files cannot be read compressed; decompress it, or use \.jsonl\.gz"):
        readers.resolve([str(tmp_path / "b.json.gz")])
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"one\ntwo\n")[:-6])  # truncated
    with pytest.raises(Exception, match=r"c\.txt\.gz: cannot be read to the end"):
        texts(tmp_path / "c.txt.gz")
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"fine\nbad \xff\n"))
    with pytest.raises(Exception, match=r"d\.txt\.gz:2: not UTF-8"):
        texts(tmp_path / "d.txt.gz")


def write_big_corpus(path: Path, megabytes: int) -> int:
    line = " ".join(sentences(400, seed=1)) + "\n"  # long documents of the tiny vocabulary
    n = megabytes * 2**20 // len(line)
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"{i} {line}")  # distinct documents: the split hash spreads them
    return n


@pytest.mark.slow
def test_a_corpus_larger_than_the_memory_limit_prepares_and_trains(tmp_path, tiny_llama):
    """Its tokens as Python lists (the old preparation) would need over 10x the limit."""
    big = tmp_path / "big.txt"
    n_docs = write_big_corpus(big, 48)  # about 9 M tokens
    config = {
        "model": {"name_or_path": str(tiny_llama)},
        "data": {"train": [str(big)], "max_seq_len": 32, "eval_fraction": 0.05, "cache_dir": str(tmp_path / "c")},
        "train": {"max_steps": 3, "micro_batch_size": 2, "log_every": 1},
        "measure": {"energy": "estimate"},
        "output": {"dir": str(tmp_path / "run"), "save_model": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, str(HELPER), str(tiny_llama), str(big), str(tmp_path / "c"), "--data-limit-mb", "250"]
    proc = subprocess.run([*cmd, "--adapt", str(tmp_path / "run.yaml")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.splitlines()[0])
    assert stats["documents"] == n_docs and stats["cache"] == "miss"
    assert stats["train_blocks"] * 32 > 8_000_000  # ~300 MB as Python lists: more than the 250 MB limit
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["data"]["cache"] == "hit"  # adapt reused the store


@pytest.mark.slow
def test_a_killed_preparation_leaves_nothing_a_later_run_trusts(tmp_path, tiny_llama):
    big = tmp_path / "big.txt"
    write_big_corpus(big, 40)
    cache = tmp_path / "c"
    cmd = [sys.executable, str(HELPER), str(tiny_llama), str(big), str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list(cache.glob(".*.tmp/train.bin")) or (next(cache.glob(".*.tmp/train.bin")).stat().st_size < 2**20):
        assert proc.poll() is None and time.time() < deadline, "the preparation ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the preparation and its workers, mid-write
    proc.wait()
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]  # no store in place
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(train=[str(big)], max_seq_len=32, eval_fraction=0.05, cache_dir=str(cache))
    again = corpus.build(cfg, tok, "clm")
    assert again.stats["cache"] == "miss" and not list(cache.glob(".*.tmp"))  # started clean
    fresh = corpus.build(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "fresh")}), tok, "clm")
    assert again.stats["train_blocks"] == fresh.stats["train_blocks"]
    assert torch.equal(again.train[-5:], fresh.train[-5:]) and torch.equal(again.eval[:], fresh.eval[:])


@pytest.mark.slow
def test_concurrent_preparers_share_one_store(tmp_path, tiny_llama):
    big = tmp_path / "big.txt"
    write_big_corpus(big, 8)
    cmd = [sys.executable, str(HELPER), str(tiny_llama), str(big), str(tmp_path / "c")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].splitlines()[0]) for p in procs]
    assert sorted(o["cache"] for o in outs) == ["hit", "miss"]  # one prepared it, the other waited
    assert outs[0]["train_blocks"] == outs[1]["train_blocks"] and outs[0]["store"] == outs[1]["store"]


@pytest.mark.slow
def test_a_tokenizer_worker_killed_by_the_oom_killer_stops_the_preparation_with_a_message(tmp_path, tiny_llama):
    """It used to hang forever, holding the store's lock, with no message."""
    import psutil

    from ecoadapt.core import locks

    big = tmp_path / "big.txt"
    write_big_corpus(big, 40)  # above WORKERS_FROM_BYTES: tokenized in worker processes
    cache = tmp_path / "c"
    cmd = [sys.executable, str(HELPER), str(tiny_llama), str(big), str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    workers: list[psutil.Process] = []
    while not workers:
        assert proc.poll() is None and time.time() < deadline, "the preparation ended before a worker started"
        time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    while not list(cache.glob(".*.tmp/train.bin")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    workers[0].kill()  # what the kernel's OOM killer does
    killed = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - killed < 30  # noticed within seconds, not never
    assert proc.returncode != 0 and "killed by SIGKILL: most likely the system ran out of memory" in err
    assert not list(cache.glob(".*.tmp")) and not [p for p in cache.iterdir() if p.is_dir()]  # nothing trusted
    assert [locks.holder(lock) for lock in cache.glob("*.lock")] == [None]  # the lock is free


def test_a_lock_wait_names_the_holder_and_gives_up_after_its_limit(tmp_path):
    from ecoadapt.core import locks
    from ecoadapt.core.errors import UserError

    said: list[str] = []
    lock = tmp_path / "store.lock"
    with locks.held(lock, "the token store X"):
        started = time.monotonic()
        pattern = rf"the token store X is in use by process {os.getpid()} on .* since .* after waiting 0.5 s"
        with pytest.raises(UserError, match=pattern), locks.held(lock, "the token store X", 0.5, said.append):
            pass
        assert 0.4 < time.monotonic() - started < 10
        assert len(said) == 1 and said[0].startswith(f"waiting for process {os.getpid()}")
    with locks.held(lock, "the token store X"):  # free once its holder let go
        pass


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    from ecoadapt.core import locks

    lock = tmp_path / "store.lock"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ecoadapt.core import locks\n"
        f"with locks.held(Path({str(lock)!r}), 'x'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert locks.holder(lock) is not None and f"process {holder.pid}" in locks.holder(lock)
    holder.kill()
    holder.wait()
    assert locks.holder(lock) is None
    with locks.held(lock, "x"):  # no waiting, no stale-lock cleanup needed
        pass


@pytest.mark.slow
def test_one_very_long_line_streams_in_bounded_memory(tmp_path, tiny_llama):
    """A 12 MiB one-line document raised peak memory by about 1 GiB (it was tokenized whole);
    under a 250 MiB data limit it must stream, in pieces."""
    big = tmp_path / "one-line.txt"
    words = " ".join(sentences(400, seed=2))
    with open(big, "w") as f:
        while f.tell() < 12 * 2**20:
            f.write(words + " ")
        f.write("\n")
        f.writelines(f"{line}\n" for line in sentences(400, seed=3))  # and short documents around it
    cmd = [sys.executable, str(HELPER), str(tiny_llama), str(big), str(tmp_path / "c"), "--data-limit-mb", "250"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.splitlines()[0])
    assert stats["documents"] == 401 and stats["documents_cut"] == 1
    assert stats["train_documents"] + stats["eval_documents"] - 400 >= 12 * 16  # in 64 KiB pieces


def test_the_pieces_of_a_document_go_to_its_split_whatever_their_own_text():
    import numpy as np

    from ecoadapt.data.tokenize_worker import init_worker, is_held_out, tokenize_chunk

    class Words:  # a tokenizer: one id per word
        def encode_batch(self, texts, add_special_tokens=False):
            return [type("E", (), {"ids": [len(w) for w in t.split()]})() for t in texts]

    init_worker(Words(), "clm", 0.5, np.dtype(np.int32).str, 0, in_process=True)
    keys = [f"document {i}" for i in range(40)]
    held = [is_held_out(k, 0.5) for k in keys]
    assert any(held) and not all(held)  # both splits occur among the keys
    # Each document in pieces whose own texts would hash to either split: the key decides.
    chunk = [(f"piece {j} of {k}", k) for k in keys for j in range(3)]
    out = tokenize_chunk(chunk)
    assert len(out["eval"][1]) == 3 * sum(held) and len(out["train"][1]) == 3 * (len(keys) - sum(held))


def test_a_store_whose_files_were_zeroed_by_a_power_cut_is_prepared_again(tmp_path, tiny_llama):
    """A zero-filled file of the right size used to be trained on (only the sizes were checked)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    corpus_path = tmp_path / "c.txt"
    corpus_path.write_text("\n".join(sentences(300, seed=4)) + "\n")
    cfg = DataConfig(train=[str(corpus_path)], max_seq_len=16, eval_fraction=0.1, cache_dir=str(tmp_path / "c"))
    expected = corpus.build(cfg, tok, "clm").train[:].clone()  # a copy: the blocks are a map of the file
    train_bin = next((tmp_path / "c").glob("*/train.bin"))
    size = train_bin.stat().st_size
    train_bin.write_bytes(b"\0" * size)  # the size a check of sizes alone trusts
    again = corpus.build(cfg, tok, "clm")
    assert again.stats["cache"] == "miss"  # not trusted: prepared again
    assert torch.equal(again.train[:], expected) and train_bin.stat().st_size == size
