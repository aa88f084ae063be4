"""The report's plots: energy vs accuracy with the Pareto front, peak memory and throughput."""

from __future__ import annotations

import io
from typing import Any

FILES = ("energy_vs_metric.png", "memory.png", "throughput.png")


def draw(
    metric: str, higher_is_better: bool, label: str, front: list[int], usable: list[dict[str, Any]]
) -> dict[str, bytes]:
    """PNG plots: energy vs the metric with the Pareto front (each point labelled with its
    general-text loss change where measured), peak memory and throughput per point.

    Args:
        metric: the row key ranked on; ``higher_is_better`` its direction; ``label`` its name.
        front: indices into ``usable`` of the Pareto front.
        usable: the rows with a metric and training energy.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    method = ", ".join(sorted({str(r.get("energy_method")) for r in usable})) or "n/a"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["train_joules"] for r in usable]
    ys = [r[metric] for r in usable]
    errors = [r.get("task_std") or 0.0 for r in usable] if metric == "task_score" else None
    ax.errorbar(xs, ys, yerr=errors, fmt="o", color="tab:blue", ecolor="0.6", capsize=3, label="recipes", zorder=3)
    for r in usable:
        forgot = f" (general {r['general_change']:+.3f})" if r.get("general_change") is not None else ""
        ax.annotate(
            r["name"] + forgot,
            (r["train_joules"], r[metric]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    if front:
        fx = [usable[i]["train_joules"] for i in front]
        fy = [usable[i][metric] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", zorder=2)
        ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="tab:red", label="Pareto front", zorder=4)
    ax.set_xlabel(f"training energy (J, {method})")
    ax.set_ylabel(
        label + (" (higher: better" if higher_is_better else " (lower: better") + ("; mean, std)" if errors else ")")
    )
    ax.set_title("Energy vs accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    out["energy_vs_metric.png"] = _png(fig)
    for key, label, fname, scale in (
        ("peak_bytes", "peak memory (MiB)", "memory.png", 2**20),
        ("tokens_per_s", "throughput (tokens/s)", "throughput.png", 1),
    ):
        fig, ax = plt.subplots(figsize=(7, max(2.5, 1.0 + 0.4 * len(usable))))
        names = [r["name"] for r in usable]
        ax.barh(names, [(r.get(key) or 0) / scale for r in usable], color="tab:green", label=label)
        ax.set_xlabel(label)
        ax.set_title(label.split(" (")[0].capitalize() + " per point")
        ax.legend(loc="lower right")
        ax.invert_yaxis()
        out[fname] = _png(fig)
    return out


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
