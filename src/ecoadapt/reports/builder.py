"""`ecoadapt report DIR`: the table, the Pareto front of cost vs accuracy, plots, a recommendation.

Reads a sweep directory (``results.jsonl``) or a single run directory (``summary.json``) and
writes ``results.csv``, ``report.md``, a self-contained ``report.html`` (plots embedded as
base64 PNG) and the PNG plots themselves.

The report leads with the verdict in words (:mod:`ecoadapt.reports.verdicts`): whether adaptation
helped the task, by how much, with paired 95% intervals. The metric is the downstream task's
(higher is better) when every point has one and some recipe's adaptation helped beyond seed
noise; else the held-out loss (lower is better), and the report says why. The cost is the
training energy (or time, or peak memory:
``report.objective``). The recommendation is the cheapest point whose metric is within
``report.tolerance`` of the best, with its ratios to the baseline point.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoadapt.config import schema
from ecoadapt.config.report import OBJECTIVES, ReportSettings
from ecoadapt.core import ownership
from ecoadapt.core.errors import UserError
from ecoadapt.core.storage import atomic_write, atomic_write_text, read_json
from ecoadapt.measure import carbon
from ecoadapt.reports import compute_statement, equal_quality, plots, verdicts
from ecoadapt.results.summary import RunSummary
from ecoadapt.results.sweep_records import PointFields, PointRecord, latest_results

# Every file a report writes into its folder, claimed in the folder's manifest before any is written.
REPORT_FILES = ("results.csv", "report.md", "report.html", "compute.md", "compute.tex", *plots.FILES)


@dataclass
class Metric:
    """What "accuracy" means for a report."""

    name: str
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        """Whether a is strictly better than b."""
        return a > b if self.higher_is_better else a < b

    def gap(self, value: float, best: float) -> float:
        """How far ``value`` falls short of ``best`` (>= 0)."""
        return best - value if self.higher_is_better else value - best


def row(point: PointFields, summary: RunSummary) -> dict[str, Any]:
    """One flat table row from a run's summary (and, in a sweep, its point's fields)."""
    out: dict[str, Any] = {
        "name": point.name
        or summary.config.get("name")
        or Path(str(summary.config.get("output", {}).get("dir", "run"))).name,
        "status": summary.status,
        "baseline": point.baseline,
        "error": summary.error if not summary.finished else None,
    }
    if not summary.finished:
        return out
    energy = summary.energy or {}
    mem = summary.memory or {}
    general = summary.eval.general if summary.eval else None
    out.update(
        {
            "train_joules": energy.get("train_joules"),
            "mj_per_token": energy.get("mj_per_token"),
            "energy_method": energy.get("method", "off"),
            "peak_bytes": mem.get(mem.get("compare_with", "peak_bytes")),
            "memory_figure": mem.get("compare_with", "peak_bytes"),
            "time_s": summary.time_s,
            "tokens_per_s": summary.tokens_per_s,
            "mfu": summary.mfu,
            "eval_loss": summary.eval.loss if summary.eval else None,
            "steps": summary.steps,
            **equal_quality.target_fields(summary.target),
            "perplexity": summary.eval.perplexity if summary.eval else None,
            "domain_gain": summary.eval.loss_before - summary.eval.loss if summary.eval else None,
            "general_change": general.change if general else None,
            "general_verdict": general.verdict if general else None,
            # The labelled task judges; a decoder judged by the harness alone is ranked on it.
            **verdicts.task_fields(summary.task or verdicts.harness_as_task(summary.harness)),
            **verdicts.harness_fields(summary.harness),
            **_compute_fields(summary),
        }
    )
    harness_joules = ((summary.harness.energy if summary.harness else None) or {}).get("joules")
    if summary.task and harness_joules:
        out["eval_joules"] = (out["eval_joules"] or 0.0) + harness_joules
    if out["train_joules"] is not None:
        out["total_joules"] = out["train_joules"] + (out["eval_joules"] or 0.0)
    return out


def _compute_fields(summary: RunSummary) -> dict[str, Any]:
    """What the compute statement needs of a run: hardware, devices, wall time, how measured."""
    energy = summary.energy or {}
    devices = summary.parallel.world_size if summary.parallel else 1
    measure = summary.config.get("measure") or {}
    phases = energy.get("phases") or {}
    return {
        "hardware": carbon.hardware(summary.environment, devices),
        "devices": devices if (summary.environment or {}).get("device") == "cuda" else 1,
        "wall_s": sum(p.get("seconds", 0.0) for p in phases.values()) if phases else summary.time_s,
        "energy_how": carbon.method_text(energy) if energy else "not measured",
        "grid_g_co2_per_kwh": measure.get("grid_g_co2_per_kwh"),
        "location": measure.get("location"),
    }


def load_rows(folder: Path, also: Sequence[Path] = ()) -> tuple[list[dict[str, Any]], ReportSettings]:
    """Rows of a sweep or a single run (and of the sweeps or runs in ``also``: ecoadapt runs and
    Trainer runs measured by EcoadaptCallback in one table), and the first folder's report
    settings (defaults for a run).

    Raises:
        UserError: the folder holds neither results.jsonl nor summary.json, or a record that
            does not fit the summary schema.
    """
    settings = ReportSettings()
    wanted: set[str] | None = None
    if (folder / "sweep.json").exists():
        try:
            manifest = read_json(folder / "sweep.json")
        except (OSError, ValueError) as e:
            raise UserError(
                f"{folder / 'sweep.json'}: cannot be read ({type(e).__name__}); rerun the sweep to write it again"
            ) from None
        settings = schema.build(ReportSettings, manifest.get("report"), str(folder / "sweep.json"), "report.")
        wanted = {p["key"] for p in manifest.get("points", [])}  # the sweep as last defined
    if (folder / "results.jsonl").exists():
        records = [PointRecord.from_line(r) for r in latest_results(folder, wanted).values()]
    elif (folder / "summary.json").exists():
        records = [PointRecord(PointFields(), RunSummary.read(folder / "summary.json"))]
    else:
        raise UserError(f"{folder}: no results.jsonl (a sweep) or summary.json (a run) here")
    if not records:
        raise UserError(f"{folder}: results.jsonl holds no results yet")
    rows = [row(r.point, r.summary) for r in records]
    for other in also:
        rows += [{**r, "baseline": False} for r in load_rows(other)[0]]
    if not any(r["baseline"] for r in rows):
        rows[0]["baseline"] = True  # a single run, or a sweep without one: compare with the first
    verdicts.add_retained_gain(rows)
    return rows, settings


def choose_metric(rows: list[dict[str, Any]]) -> Metric:
    """The downstream metric when every completed point has one and some recipe's adaptation
    helped the task beyond seed noise; else the held-out loss (a task no recipe moves cannot
    rank them)."""
    ok = [r for r in rows if r.get("error") is None and r["status"] != "failed"]
    if ok and all(r.get("task_score") is not None for r in ok) and verdicts.any_helped(ok):
        return Metric("task_score", True)
    return Metric("eval_loss", False)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point dominates (cost lower-or-equal, metric at least as
    good, and one of them strictly), sorted by cost. Exact duplicates are all kept."""
    front = []
    for i, (ci, mi) in enumerate(points):
        dominated = False
        for j, (cj, mj) in enumerate(points):
            if i == j:
                continue
            no_worse = cj <= ci and (mj >= mi if higher_is_better else mj <= mi)
            strictly = cj < ci or (mj > mi if higher_is_better else mj < mi)
            if no_worse and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def recommend(
    rows: list[dict[str, Any]],
    metric: Metric,
    tolerance: float,
    objective: str = "energy",
    equal: bool = False,
    max_forgetting: float | None = None,
) -> dict[str, Any] | None:
    """The cheapest point whose metric is within ``tolerance`` of the best, with ratios; with
    ``equal`` (an equal-quality sweep) energy is the joules to the baseline's held-out loss, and
    a recipe that never reached it is not a candidate; with ``max_forgetting``, nor is one whose
    general-text loss rose by more than that (nats).

    Returns:
        {"name", "row", "ratios": {...}, "text"} or None when no point completed (or none
        forgot little enough).
    """
    cost_key = "joules_to_target" if equal and objective == "energy" else OBJECTIVES[objective]
    usable = [r for r in rows if r.get(metric.name) is not None and r.get(cost_key) is not None]
    if max_forgetting is not None:
        usable = [r for r in usable if r.get("general_change") is None or r["general_change"] <= max_forgetting]
    if not usable:
        return None
    best = max(usable, key=lambda r: r[metric.name] if metric.higher_is_better else -r[metric.name])
    within = [r for r in usable if metric.gap(r[metric.name], best[metric.name]) <= tolerance + 1e-12]
    if equal and metric.name == "eval_loss":  # every point that reached the target has the baseline's loss
        within = usable
    # Cheapest first; ties broken by memory, then time, then the better metric.
    chosen = min(
        within,
        key=lambda r: (
            r[cost_key],
            r.get("peak_bytes") or 0,
            r.get("time_s") or 0,
            -r[metric.name] if metric.higher_is_better else r[metric.name],
        ),
    )
    base = next((r for r in rows if r["baseline"] and r.get(cost_key) is not None), None)
    ratios: dict[str, float | None] = {}
    parts = []
    if base is not None:
        energy_key = "joules_to_target" if equal else "train_joules"
        for key, label in ((energy_key, "energy"), ("peak_bytes", "peak memory"), ("time_s", "time")):
            if chosen.get(key) and base.get(key):
                ratios[label] = chosen[key] / base[key] - 1
                parts.append(f"{label} {ratios[label]:+.0%}")
        delta = chosen[metric.name] - base[metric.name]
        ratios["metric_delta"] = delta
        paired = verdicts.versus_baseline(chosen, base) if metric.name == "task_score" else None
        if paired is not None and chosen is not base:
            parts.append(f"{_metric_label(metric)} {paired.text()}")
        else:
            parts.append(f"{_metric_label(metric)} {delta:+.4f}")
    text = f"{chosen['name']}: " + (", ".join(parts) + " vs the baseline" if parts else "the only point")
    return {"name": chosen["name"], "row": chosen, "ratios": ratios, "text": text, "best": best["name"]}


def _metric_label(metric: Metric) -> str:
    return "held-out loss" if metric.name == "eval_loss" else "downstream metric"


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{value / 2**20:,.0f} MiB"
    if kind == "pct":
        return f"{value:.1%}"
    if kind and isinstance(value, (int, float)):
        return format(value, kind)
    return str(value)


COLUMNS = [  # (row key, heading, format: a format spec, "bytes" or "pct")
    ("name", "point", ""),
    ("status", "status", ""),
    ("train_joules", "train energy (J)", ",.1f"),
    ("mj_per_token", "mJ/token", ",.2f"),
    ("energy_method", "energy method", ""),
    ("peak_bytes", "peak memory", "bytes"),
    ("time_s", "time (s)", ",.1f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("mfu", "MFU", "pct"),
    ("eval_loss", "held-out loss", ".4f"),
    ("perplexity", "perplexity", ",.1f"),
    ("domain_gain", "domain loss gain", "+.4f"),
    ("general_change", "general loss change", "+.4f"),
    ("task_score", "downstream", ".4f"),
    ("task_delta", "gain vs base", "+.4f"),
    ("gain_low", "gain 95% CI low", "+.4f"),
    ("gain_high", "gain 95% CI high", "+.4f"),
    ("verdict", "verdict", ""),
    ("retained", "retained gain", "pct"),
    ("harness_score", "harness", ".4f"),
    ("harness_delta", "harness gain", "+.4f"),
    ("harness_verdict", "harness verdict", ""),
    ("eval_joules", "evaluation energy (J)", ",.1f"),
    ("total_joules", "total energy (J)", ",.1f"),
]


def _cells(r: dict[str, Any], front: set[str]) -> list[str]:
    cells = []
    for key, _, kind in COLUMNS:
        value = r.get(key)
        if key == "name":
            value = f"{value}{' (baseline)' if r['baseline'] else ''}{' *' if value in front else ''}"
        if key == "status" and r.get("error"):
            value = f"failed: {r['error']}"
        cells.append(_fmt(value, kind))
    return cells


def markdown_table(rows: list[dict[str, Any]], front: set[str]) -> str:
    """The table of every point, Pareto-front members starred."""
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r, front)) + " |" for r in rows]
    return "\n".join(lines)


def build(
    folder: Path, tolerance: float | None = None, objective: str | None = None, also: Sequence[Path] = ()
) -> dict[str, Any]:
    """Write the report files into ``folder`` and return the recommendation and headline.

    Args:
        tolerance: overrides the sweep's report.tolerance.
        objective: overrides the sweep's report.objective (energy, time, memory).
        also: more sweep or run folders whose points join the table (the first folder's
            baseline stays the baseline).
    """
    rows, settings = load_rows(folder, also)
    tolerance = tolerance if tolerance is not None else settings.tolerance
    objective = objective or settings.objective
    if objective not in OBJECTIVES:
        raise UserError(f"report.objective = {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if tolerance < 0:
        raise UserError(f"report.tolerance = {tolerance}: must not be negative")
    metric = choose_metric(rows)
    usable = [r for r in rows if r.get(metric.name) is not None and r.get("train_joules") is not None]
    front = pareto_front([(r["train_joules"], r[metric.name]) for r in usable], metric.higher_is_better)
    front_names = {usable[i]["name"] for i in front}
    equal = equal_quality.prepare(rows)
    bound = settings.max_general_loss_increase
    rec = verdicts.base_model_recommendation(rows) or recommend(rows, metric, tolerance, objective, equal, bound)
    if rec is not None and bound is not None and rec["row"] is not None:
        rec["text"] += f" (of the recipes whose general-text loss rose by at most {bound:g} nats)"
    table = markdown_table(rows, front_names)
    images = plots.draw(metric.name, metric.higher_is_better, _metric_label(metric), front, usable) if usable else {}
    out = ownership.Folder(folder, "report")
    out.claim(*REPORT_FILES)  # refused, before anything is written, where one is the user's
    with out.sealed_on_exit():
        _write_files(folder, rows, metric, tolerance, objective, rec, front_names, equal, table, images)
    return {
        "recommendation": rec,
        "verdict": verdicts.headline(rows),
        "table": table,
        "metric": metric.name,
        "front": sorted(front_names),
        "notes": _all_notes(rows, usable, metric, tolerance, objective),
    }


def _all_notes(
    rows: list[dict[str, Any]], usable: list[dict[str, Any]], metric: Metric, tolerance: float, objective: str
) -> list[str]:
    notes = _notes(usable, metric, tolerance, objective)
    energy = verdicts.energy_line(rows)
    if energy:
        notes.insert(1, energy)
    forgetting = verdicts.forgetting_line(rows)
    if forgetting:
        notes.append(forgetting)
    return notes


def _write_files(
    folder: Path,
    rows: list[dict[str, Any]],
    metric: Metric,
    tolerance: float,
    objective: str,
    rec: dict[str, Any] | None,
    front_names: set[str],
    equal: Any,
    table: str,
    images: dict[str, bytes],
) -> None:
    """results.csv, the plots, report.md, compute.md/.tex and report.html."""
    usable = [r for r in rows if r.get(metric.name) is not None and r.get("train_joules") is not None]
    _write_csv(folder / "results.csv", rows, front_names)
    for name, data in images.items():
        _write_bytes(folder / name, data)
    notes = _all_notes(rows, usable, metric, tolerance, objective)
    verdict = verdicts.headline(rows)
    rec_text = rec["text"] if rec else "no point completed"
    md = "\n\n".join(
        [
            "# ecoadapt report",
            "**Verdict:** " + verdict[0] + "".join(f"\n- {line}" for line in verdict[1:]),
            f"**Recommendation:** {rec_text}",
            *([equal_quality.section(rows)] if equal else []),
            table,
            "\n".join(f"- {n}" for n in notes),
            "\n".join(f"![{n}]({n})" for n in images),
        ]
    )
    atomic_write_text(folder / "report.md", md + "\n")
    compute_statement.write(folder, rows)
    atomic_write_text(folder / "report.html", _html_page(rows, front_names, [*verdict, rec_text], notes, images))


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _write_csv(path: Path, rows: list[dict[str, Any]], front: set[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[c[0] for c in COLUMNS] + ["baseline", "on_front", "error"])
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                **{c[0]: r.get(c[0]) for c in COLUMNS},
                "baseline": r["baseline"],
                "on_front": r["name"] in front,
                "error": r.get("error"),
            }
        )
    atomic_write_text(path, buffer.getvalue())


def _notes(usable: list[dict[str, Any]], metric: Metric, tolerance: float, objective: str) -> list[str]:
    """What every figure of the report is, in words."""
    methods = sorted({str(r.get("energy_method")) for r in usable})
    memory_figures = sorted({str(r.get("memory_figure")) for r in usable})
    estimated = " (CPU time x watts per core: comparable between points on this machine, not a measurement)"
    return [
        f"Energy: {', '.join(methods)}" + (estimated if "estimated" in methods else "") + ".",
        f"Peak memory: {', '.join(memory_figures)} of the training window (on CPU, the peak above the "
        "process's resident set before the model loaded: the recipe's own cost).",
        f"Metric: {_metric_label(metric)}; tolerance {tolerance}; objective: lowest {objective}. "
        "Points marked * are on the Pareto front.",
    ]


def _html_page(
    rows: list[dict[str, Any]], front: set[str], lead: list[str], notes: list[str], images: dict[str, bytes]
) -> str:
    """The report as one HTML page; ``lead``: the verdict's lines, then the recommendation."""
    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(d).decode()}"></figure>'
        for n, d in images.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ecoadapt report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
        "</head><body><h1>ecoadapt report</h1>"
        f"<p><b>Verdict:</b> {html.escape(lead[0])}</p>"
        f"<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in lead[1:-1])}</ul>"
        f"<p><b>Recommendation:</b> {html.escape(lead[-1])}</p>"
        f"{_html_table(rows, front)}<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>{imgs}</body></html>"
    )


def _html_table(rows: list[dict[str, Any]], front: set[str]) -> str:
    head = "".join(f"<th>{html.escape(c[1])}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r, front)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
