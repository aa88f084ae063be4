"""Transparent huge pages for torch's CPU tensors, on and off, per recipe: what ``adapt`` asks
for a quantized base (``THP_MEM_ALLOC_ENABLE=1``, see ecoadapt.core.heap.huge_pages_for_torch)
against the same run with the variable set to 0.

Each recipe runs ``--rounds`` pairs of fresh ``ecoadapt adapt`` processes, the order alternating
every round (the machine is shared: compare within one invocation). Figures per run: the process
tree's resident peak (bench/lean_load.py's sampler), the run's own load and training peaks, the
children's CPU seconds (user + sys) and seconds per step.

    python bench/huge_pages.py --model /tmp/models/tinyllama --recipes "qlora nf4" "qlora int8"
        [--steps 8 --rounds 2] [--json bench/results/huge-pages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import lean_load  # bench/ is on the path when this file runs: the same recipes and sampler

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def one_run(model: str, recipe: str, steps: int, huge: bool, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    cfg = lean_load.config(model, recipe, steps)
    cfg["output"]["dir"] = str(work / "run")
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", VARIABLE: "1" if huge else "0"}
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    command = [sys.executable, "-m", "ecoadapt", "adapt", str(work / "config.yaml")]
    status, peak, _ = lean_load.tree_peak(command, env, work / "log.txt")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row: dict[str, Any] = {"recipe": recipe, "huge_pages": huge, "exit": status, "wall_s": round(time.time() - started)}
    row["cpu_s"] = round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1)
    row["tree_peak_gib"] = round(peak / 2**30, 3)
    if status == 0:
        summary = json.loads((work / "run" / "summary.json").read_text())
        memory = summary.get("memory") or {}
        row["load_peak_gib"] = round((memory.get("load_peak_bytes") or 0) / 2**30, 3)
        row["train_peak_gib"] = round((memory.get("train_peak_bytes") or 0) / 2**30, 3)
        row["step_s"] = round(summary["time_s"] / max(1, summary["steps"]), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (bench/random_llama.py)")
    parser.add_argument("--recipes", nargs="*", default=["qlora nf4", "qlora int8"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for n in range(args.rounds):
                for huge in (False, True) if n % 2 == 0 else (True, False):
                    where = Path(tmp) / f"{recipe.replace(' ', '_')}-{int(huge)}-{n}"
                    rows.append(one_run(args.model, recipe, args.steps, huge, where))
                    print(rows[-1], flush=True)
    if args.json:
        setup = {
            "model": args.model, "steps": args.steps, "rounds": args.rounds, "cpu": lean_load._cpu(),
            "thp_mode": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
        }  # fmt: skip
        args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
