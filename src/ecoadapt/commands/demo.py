"""`ecoadapt demo`: the whole job on the embedded default, offline, in minutes.

Runs the shipped ``demo`` sweep (see presets/sweeps/demo.yaml): MiniLM-L6 adapted to the Python
standard library's docstrings, four recipes from the fp32 baseline to the most frugal, each
judged on a downstream task of the same domain; then the report and its recommendation.
``--quick`` runs three recipes with a smaller budget (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ecoadapt.commands import sweep
from ecoadapt.core.progress import say
from ecoadapt.reports import builder

SOURCE = (
    "corpus: docstrings of the Python standard library (Python {version}, read from its own source "
    "files; written by the CPython developers). task: which of 8 standard-library packages a "
    "docstring comes from."
)
QUICK = [
    "train.max_steps=12",
    "train.micro_batch_size=8",
    "data.eval_max_blocks=8",
    "task.max_train_examples=240",
    "task.epochs=1",
]


def run_demo(out: Path, quick: bool = False) -> dict[str, Any]:
    """Run the demo sweep into ``out`` and build its report; returns the report's headline."""
    import platform

    preset = Path(str(resources.files("ecoadapt") / "presets" / "sweeps" / "demo.yaml"))
    spec = sweep.load(preset, QUICK if quick else [])
    spec.out, spec.key = out, "--out"
    if quick:  # three recipes: the baseline, one in between, the most frugal
        spec.points = [p for p in spec.points if p.name != "auto-full"]
    say(SOURCE.format(version=platform.python_version()))
    say(f"{len(spec.points)} recipes, one process each; results in {out}")
    sweep.run_points(spec)
    return builder.build(out)
