"""What mapping large blocks during a converting load saves: the NF4 load of a model folder, in a
fresh process each way, alternating.

- ``mapped``: ecoadapt's load as shipped (:func:`ecoadapt.core.heap.large_blocks_mapped` around
  the load: each tensor's freed read copy goes back to the system);
- ``glibc``: the same load with that context replaced by nothing (glibc's own threshold, which
  rises to the largest block freed and keeps later freed copies in the heap).

Figure: the process's resident peak during ``pretrained.load`` (the kernel's high-water mark,
reset just before it: :func:`ecoadapt.measure.memory.reset_rss_peak`) and what stays resident
after it. Raw: ``bench/results/heap_load.json``.

    python bench/heap_load.py --model /tmp/tinyllama [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(model: str, side: str) -> dict[str, Any]:
    from ecoadapt.config import ModelConfig
    from ecoadapt.core import heap
    from ecoadapt.measure import memory
    from ecoadapt.model import pretrained
    from ecoadapt.model.load_spec import Recipe

    if side == "glibc":
        heap.large_blocks_mapped = contextlib.nullcontext  # type: ignore[assignment]
    before = memory.rss_bytes()
    memory.reset_rss_peak()  # where the kernel refuses, the peak since start: imports only, below the load's
    start = time.perf_counter()
    pretrained.load(ModelConfig(name_or_path=model, objective="clm"), 128, recipe=Recipe("bf16", True, False, "nf4"))
    seconds = time.perf_counter() - start
    peak = memory.peak_rss_bytes()
    return {"before_bytes": before, "peak_bytes": peak, "after_bytes": memory.rss_bytes(), "load_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (bench/random_llama.py)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "heap_load.json")
    parser.add_argument("--child", choices=["mapped", "glibc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child)))
        return
    runs: dict[str, list[dict[str, Any]]] = {"mapped": [], "glibc": []}
    for _ in range(args.repeats):
        for side in runs:
            command = [sys.executable, __file__, "--child", side, "--model", args.model]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{side}: {done.stderr[-2000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            runs[side].append(r)
            print(f"{side:7} peak {r['peak_bytes'] / 2**30:.2f} GiB, after {r['after_bytes'] / 2**30:.2f}, "
                  f"{r['load_s']:.1f} s")  # fmt: skip
    ratio = min(r["peak_bytes"] for r in runs["mapped"]) / min(r["peak_bytes"] for r in runs["glibc"])
    print(f"mapped / glibc load peak (best of {args.repeats}): {ratio:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "recipe": "NF4 base, bf16", "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
