"""Recipes compared at equal quality: which reaches the baseline's held-out loss for the fewest
joules (a sweep with ``compare: equal_loss``, where every other point trains until it reaches
that loss or its cap). Comparing at an equal number of steps asks another question: a frugal
recipe that learns more slowly looks cheap there only because it stopped short.
"""

from __future__ import annotations

from typing import Any


def target_fields(target: dict[str, Any] | None) -> dict[str, Any]:
    """A report row's equal-quality figures from a summary's ``target`` (none without one)."""
    if not target:
        return {}
    return {
        "target_loss": target["loss"],
        "target_reached": bool(target["reached"]),
        "joules_to_target": target.get("train_joules") if target["reached"] else None,
        "steps_to_target": target.get("step"),
        "best_eval_loss": target.get("best_eval_loss"),
    }


def prepare(rows: list[dict[str, Any]]) -> bool:
    """Whether the rows are an equal-quality comparison; if so, the baseline (which set the
    target with its own final loss) is given its own figures: it reached the target at its last
    step, for its whole training energy."""
    if not any("target_reached" in r for r in rows):
        return False
    for r in rows:
        if r["baseline"] and "target_reached" not in r and r.get("eval_loss") is not None:
            r.update(
                target_loss=r["eval_loss"], target_reached=True, joules_to_target=r.get("train_joules"),
                steps_to_target=r.get("steps"), best_eval_loss=r["eval_loss"],
            )  # fmt: skip
    return True


def section(rows: list[dict[str, Any]]) -> str:
    """The report's equal-quality paragraph: recipes ranked by joules to the target, and those
    that never got there."""
    base = next((r for r in rows if r["baseline"] and r.get("target_reached")), None)
    reached = sorted((r for r in rows if r.get("target_reached") and r.get("joules_to_target") is not None),
                     key=lambda r: r["joules_to_target"])  # fmt: skip
    missed = [r for r in rows if r.get("target_reached") is False]
    target = base["target_loss"] if base else next((r["target_loss"] for r in rows if "target_loss" in r), None)
    lines = [f"**Equal quality** (held-out loss {target:.4f}, the baseline's): training joules to reach it"]
    for r in reached:
        ratio = f", {r['joules_to_target'] / base['joules_to_target']:.2f}x the baseline's" if base and base.get(
            "joules_to_target") else ""  # fmt: skip
        lines.append(f"- {r['name']}: {r['joules_to_target']:,.0f} J in {r['steps_to_target']} steps{ratio}")
    for r in missed:
        best = f"{r['best_eval_loss']:.4f}" if r.get("best_eval_loss") is not None else "none evaluated"
        lines.append(f"- {r['name']}: never reached it within its cap ({r.get('steps')} steps; best {best})")
    return "\n".join(lines)
