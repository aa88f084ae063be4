"""A compute statement for papers: ``compute.md`` and ``compute.tex`` beside every report.

A paragraph and a table: the hardware, device-hours, energy per recipe and in all (adaptation
and evaluation apart), what was measured and what estimated and how, CO2e with the grid
intensity used and where it came from, and how to cite ecoadapt. It answers the compute
questions of the NeurIPS paper checklist (type of compute workers, memory, time of execution,
total compute) in the spirit of the Machine Learning Impact calculator's LaTeX paragraph.
No torch: it reads the report's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecoadapt.core.storage import atomic_write_text
from ecoadapt.measure import carbon

CITATION = (
    "ecoadapt: adapt a pretrained language model to a new domain on modest hardware, and measure "
    "what it costs (software; see CITATION.cff in its repository)"
)


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rows if r.get("train_joules") is not None]
    train = sum(r["train_joules"] for r in done)
    evaluation = sum(r.get("eval_joules") or 0.0 for r in done)
    hours = sum((r.get("wall_s") or 0.0) * (r.get("devices") or 1) for r in done) / 3600
    grids = {r.get("grid_g_co2_per_kwh") for r in done}
    grid = carbon.grid(grids.pop() if len(grids) == 1 else None)
    return {
        "runs": done,
        "train_j": train,
        "eval_j": evaluation,
        "device_hours": hours,
        "grid": grid,
        "hardware": sorted({str(r.get("hardware")) for r in done}),
        "how": sorted({str(r.get("energy_how")) for r in done}),
        "locations": sorted({str(r["location"]) for r in done if r.get("location")}),
    }


def _kwh(joules: float) -> str:
    return f"{carbon.kwh(joules):.3g} kWh"


def paragraph(rows: list[dict[str, Any]]) -> str:
    """The statement's prose (plain text, for Markdown and, escaped, for LaTeX)."""
    t = _totals(rows)
    if not t["runs"]:
        return "No run of this report completed, so there is no compute to state."
    total = t["train_j"] + t["eval_j"]
    where = f" in {', '.join(t['locations'])}" if t["locations"] else ""
    return (
        f"The experiments ran on {'; '.join(t['hardware'])}{where}. The {len(t['runs'])} runs took "
        f"{t['device_hours']:.3g} device-hours and {_kwh(total)} in all "
        f"({total:,.0f} J): {_kwh(t['train_j'])} adapting the models and "
        f"{_kwh(t['eval_j'])} evaluating them on the downstream task. Energy was "
        f"{'; '.join(t['how'])}. At a grid intensity of {t['grid'].g_per_kwh:g} g CO2e/kWh "
        f"({t['grid'].source}) this is {t['grid'].grams(total):.3g} g CO2e. Figures were recorded "
        f"by {CITATION}."
    )


COLUMNS = [  # (heading, value of a row)
    ("recipe", lambda r: str(r["name"])),
    ("device-hours", lambda r: f"{(r.get('wall_s') or 0) * (r.get('devices') or 1) / 3600:.3f}"),
    ("adaptation (kWh)", lambda r: f"{carbon.kwh(r['train_joules']):.3g}"),
    ("evaluation (kWh)", lambda r: f"{carbon.kwh(r.get('eval_joules') or 0):.3g}"),
    ("peak memory (MiB)", lambda r: f"{(r.get('peak_bytes') or 0) / 2**20:,.0f}"),
    ("energy", lambda r: str(r.get("energy_method"))),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    """compute.md: the paragraph and the per-recipe table."""
    done = _totals(rows)["runs"]
    table = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    table += ["| " + " | ".join(f(r) for _, f in COLUMNS) + " |" for r in done]
    return "# Compute statement\n\n" + paragraph(rows) + "\n\n" + "\n".join(table) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("$", "\\$")):
        text = text.replace(a, b)
    return text


def latex(rows: list[dict[str, Any]]) -> str:
    """compute.tex: the paragraph and a tabular, ready to \\input."""
    done = _totals(rows)["runs"]
    body = " \\\\\n".join(" & ".join(_tex(f(r)) for _, f in COLUMNS) for r in done)
    return (
        "% Written by ecoadapt report: the compute behind these results.\n"
        f"{_tex(paragraph(rows))}\n\n"
        "\\begin{table}[h]\n\\centering\n"
        f"\\begin{{tabular}}{{l{'r' * (len(COLUMNS) - 1)}}}\n\\hline\n"
        + " & ".join(_tex(c[0]) for c in COLUMNS)
        + " \\\\\n\\hline\n"
        + (body + " \\\\\n" if body else "")
        + "\\hline\n\\end{tabular}\n\\caption{Compute per recipe (adaptation and evaluation energy apart).}\n"
        "\\end{table}\n"
    )


def write(folder: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """compute.md and compute.tex into ``folder``."""
    atomic_write_text(folder / "compute.md", markdown(rows))
    atomic_write_text(folder / "compute.tex", latex(rows))
    return [folder / "compute.md", folder / "compute.tex"]
