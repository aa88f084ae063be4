"""The report's verdict in words: did adaptation help the task, by how much, and how much of
the baseline recipe's gain each cheaper recipe keeps (all paired by seed; see :mod:`stats`).

Works on the report's flat rows (pure Python, no torch).
"""

from __future__ import annotations

from typing import Any

from ecoadapt.results.judged import HarnessResult, PairedGain, TaskResult
from ecoadapt.task import stats


def task_fields(task: TaskResult | None) -> dict[str, Any]:
    """The task's figures for a report row (every key present; None where not known)."""
    out: dict[str, Any] = dict.fromkeys(
        ("task_metric", "task_mode", "task_score", "task_base", "task_std", "task_delta", "gain_low", "gain_high",
         "verdict", "verdict_text", "eval_joules", "task_error"),
    )  # fmt: skip
    out["adapted_by_seed"], out["gain_by_seed"] = {}, {}
    if task is None:
        return out
    out["eval_joules"] = (task.energy or {}).get("joules")
    if task.failed:
        out["task_error"] = task.error
        return out
    out.update(
        {
            "task_metric": task.metric,
            "task_mode": task.mode or "finetune",
            "task_score": task.adapted,
            "task_base": task.base,
            "task_std": task.adapted_std,
            "task_delta": task.delta,
            "gain_low": task.gain.ci_low if task.gain else None,
            "gain_high": task.gain.ci_high if task.gain else None,
            "verdict": task.verdict,
            "verdict_text": task.verdict_text,
            "adapted_by_seed": task.adapted_by_seed(),
            "gain_by_seed": task.gain_by_seed(),
        }
    )
    return out


def harness_as_task(harness: HarnessResult | None) -> TaskResult | None:
    """The harness's first task in the shape of a task result, for a run judged by the harness
    alone (a decoder without a labelled task): the report ranks and recommends on it as on a
    task (its gain paired by item, not by seed: no retained share is computed from it)."""
    if harness is None:
        return None
    if harness.failed:
        return TaskResult(status="failed", error=harness.error, retry=harness.retry, energy=harness.energy)
    first = harness.tasks[0] if harness.tasks else None
    if first is None or first.base is None:
        return None
    gain = first.gain
    return TaskResult(
        metric=f"{first.name} {first.metric}",
        mode=f"harness {harness.fewshot}-shot",
        adapted=first.adapted,
        base=first.base,
        adapted_std=first.adapted_stderr,
        delta=gain.mean if gain else None,
        # Paired by item: no per-seed gains, so no retained share.
        gain=PairedGain(gain.mean, gain.ci_low, gain.ci_high, gain.n) if gain else None,
        verdict=first.verdict,
        verdict_text=first.verdict_text,
        energy=harness.energy,
    )


def harness_fields(harness: HarnessResult | None) -> dict[str, Any]:
    """The harness's first task for a report row's own columns (every key present)."""
    out: dict[str, Any] = dict.fromkeys(("harness_task", "harness_score", "harness_delta", "harness_verdict"))
    first = harness.tasks[0] if harness is not None and harness.tasks else None
    if first is None:
        return out
    out.update(
        harness_task=f"{first.name} {first.metric}",
        harness_score=first.adapted,
        harness_delta=first.gain.mean if first.gain else None,
        harness_verdict=first.verdict,
    )
    return out


def forgetting_line(rows: list[dict[str, Any]]) -> str | None:
    """Which recipe forgot least (the smallest rise of the general-text loss), and for how many
    joules; None when no point measured general text."""
    measured = [r for r in rows if r.get("general_change") is not None and r.get("train_joules")]
    if not measured:
        return None
    least = min(measured, key=lambda r: (r["general_change"], r["train_joules"]))
    parts = ", ".join(f"{r['name']} {r['general_change']:+.4f} ({r.get('general_verdict')})" for r in measured)
    return (
        f"General text (forgetting: its loss after minus before, nats; paired by batch): {parts}. Least: "
        f"{least['name']}, {least['general_change']:+.4f} for {least['train_joules']:,.0f} J of training."
    )


def add_retained_gain(rows: list[dict[str, Any]]) -> None:
    """Each row's ``retained``: its gain over the baseline recipe's, with an interval, when the
    baseline's own gain is detectable (else None: a share of no effect means nothing)."""
    base = next((r for r in rows if r["baseline"]), None)
    for r in rows:
        r["retained"] = r["retained_low"] = r["retained_high"] = None
    if base is None or base.get("verdict") != "helped":
        return
    for r in rows:
        interval = stats.retained_gain(r.get("gain_by_seed") or {}, base["gain_by_seed"])
        if interval is not None:
            r["retained"], r["retained_low"], r["retained_high"] = interval.mean, interval.low, interval.high


def versus_baseline(row: dict[str, Any], base: dict[str, Any]) -> stats.Interval | None:
    """The recipe's adapted score minus the baseline recipe's, paired by seed (None: no seeds
    in common)."""
    try:
        gain, _ = stats.paired_gain(base.get("adapted_by_seed") or {}, row.get("adapted_by_seed") or {})
    except ValueError:
        return None
    return gain


def any_helped(rows: list[dict[str, Any]]) -> bool:
    """Whether some recipe's adaptation helped the task beyond seed noise."""
    return any(r.get("verdict") == "helped" for r in rows)


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """The verdict in words, first thing in the report: per recipe, and what it means for the
    ranking."""
    judged = [r for r in rows if r.get("verdict")]
    failed = [r for r in rows if r.get("task_error")]
    if not judged:
        lines = [
            "No point has a paired task result (no task, or no adapted model): recipes are ranked by "
            "held-out domain loss, the adaptation's own objective."
        ]
        return lines + [f"{r['name']}: task failed ({r['task_error']})" for r in failed]
    metric = judged[0].get("task_metric") or "metric"
    helped = [r for r in judged if r["verdict"] == "helped"]
    if helped:
        lines = [
            f"Adaptation helped the task ({metric}, adapted minus base, paired by seed) for {len(helped)} "
            f"of {len(judged)} recipes; recipes are ranked by the task's score."
        ]
    elif hurt := [r for r in judged if r["verdict"] == "hurt"]:
        lines = [
            f"No recipe's adaptation helped the task ({metric}); {len(hurt)} of {len(judged)} hurt it beyond seed "
            "noise (the base model does better there), so the task cannot rank them: recipes are ranked by "
            "held-out domain loss (the adaptation's own objective) instead."
        ]
    else:
        lines = [
            f"No recipe's adaptation changed the task ({metric}) beyond seed noise, so the task cannot rank "
            "them: recipes are ranked by held-out domain loss (the adaptation's own objective) instead."
        ]
    lines += [f"{r['name']}: {r['verdict']}: {r['verdict_text'].split(': ', 1)[-1]}" for r in judged]
    lines += [f"{r['name']}: task failed ({r['task_error']})" for r in failed]
    retained = [r for r in rows if r.get("retained") is not None and not r["baseline"]]
    for r in retained:
        lo, hi = r["retained_low"], r["retained_high"]
        lines.append(f"{r['name']} keeps {r['retained']:.0%} of the baseline's gain (95% CI {lo:.0%} to {hi:.0%}).")
    return lines


def energy_line(rows: list[dict[str, Any]]) -> str | None:
    """Adaptation and evaluation energy apart, and their sum, over every point."""
    train = sum(r.get("train_joules") or 0.0 for r in rows)
    evaluation = sum(r.get("eval_joules") or 0.0 for r in rows)
    if not train and not evaluation:
        return None
    share = evaluation / (train + evaluation)
    return (
        f"Energy in all: adaptation {train:,.0f} J + evaluation {evaluation:,.0f} J = {train + evaluation:,.0f} J, "
        f"evaluation {share:.0%} of it (the base model's task results are computed once and reused: their joules "
        "count where they were computed)."
    )


def base_model_recommendation(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Not adapting is a recipe too: when recipes were judged on the task and none helped it
    beyond seed noise, the base model (0 J of adaptation) is the recommendation, and the recipe
    whose gain interval reaches highest is named only as the next thing to try, with its cost.
    None when some recipe helped, or nothing was judged."""
    judged = [r for r in rows if r.get("verdict") and r.get("gain_high") is not None]
    if not judged or any_helped(rows):
        return None
    likeliest = max(judged, key=lambda r: (r["gain_high"], r.get("gain_low") or float("-inf")))
    interval = f"{likeliest['task_delta']:+.4f}, 95% CI {likeliest['gain_low']:+.4f} to {likeliest['gain_high']:+.4f}"
    text = (
        f"the base model, not adapted (0 J of adaptation): no recipe's adaptation helped the task beyond seed "
        f"noise ({len(judged)} judged), so adapting did not pay here. "
    )
    if likeliest["gain_high"] < 0:  # every interval lies below zero: no recipe of this setup is worth a retry
        text += (
            f"Every recipe hurt it (the closest, {likeliest['name']}: {interval}): another base model, corpus or "
            "task is the next thing to try, not another recipe of this one."
        )
        return {"name": "base model", "row": None, "ratios": {}, "text": text, "best": None, "next": None}
    cost = f", at {likeliest['train_joules']:,.0f} J of training" if likeliest.get("train_joules") else ""
    text += f"Next to try, if any: {likeliest['name']}, whose gain interval reaches highest ({interval}){cost}."
    return {"name": "base model", "row": None, "ratios": {}, "text": text, "best": None, "next": likeliest["name"]}
