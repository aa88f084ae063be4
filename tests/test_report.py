"""Pareto front and recommendation on synthetic points; the report files."""

import csv
import json

import pytest

from ecoadapt import report
from ecoadapt.errors import UserError
from ecoadapt.summary import EvalSummary, RunSummary


def test_pareto_front_basic_and_ties():
    # (cost, metric) with higher metric better
    points = [(10, 0.80), (5, 0.80), (5, 0.70), (20, 0.90), (20, 0.85), (5, 0.80)]
    front = report.pareto_front(points, higher_is_better=True)
    # (5, .80) twice (exact ties both kept), (20, .90); (10, .80) is dominated by (5, .80)
    assert front == [1, 5, 3]


def test_pareto_front_lower_is_better_and_single_point():
    assert report.pareto_front([(3.0, 2.5)], higher_is_better=False) == [0]
    points = [(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0)]
    assert report.pareto_front(points, higher_is_better=False) == [0, 1, 3]  # (3, 2.5) is dominated


def test_pareto_front_when_one_point_dominates_all():
    points = [(1, 0.9), (2, 0.8), (3, 0.7)]
    assert report.pareto_front(points, higher_is_better=True) == [0]


def rows(*specs):
    out = []
    for name, joules, loss, peak, baseline in specs:
        out.append(
            {"name": name, "status": "completed", "baseline": baseline, "error": None, "train_joules": joules,
             "eval_loss": loss, "peak_bytes": peak, "time_s": joules / 10}
        )  # fmt: skip
    return out


def test_recommendation_is_cheapest_within_tolerance_with_ratios():
    table = rows(
        ("fp32", 1000.0, 2.00, 800, True),
        ("bf16", 500.0, 2.02, 800, False),
        ("lora", 300.0, 2.30, 400, False),  # cheapest, but 0.30 worse: outside tolerance
    )
    rec = report.recommend(table, report.Metric("eval_loss", False), tolerance=0.05)
    assert rec["name"] == "bf16"
    assert rec["ratios"]["energy"] == pytest.approx(-0.5)
    assert rec["ratios"]["peak memory"] == pytest.approx(0.0)
    assert rec["ratios"]["metric_delta"] == pytest.approx(0.02)
    assert "energy -50%" in rec["text"] and "peak memory +0%" in rec["text"]
    assert report.recommend(table, report.Metric("eval_loss", False), tolerance=0.5)["name"] == "lora"
    assert report.recommend(table, report.Metric("eval_loss", False), 0.5, objective="memory")["name"] == "lora"
    # Within 0.05 fp32 and bf16 tie on memory: the tie goes to the faster (and cheaper) one.
    assert report.recommend(table, report.Metric("eval_loss", False), 0.05, objective="memory")["name"] == "bf16"


def test_recommendation_ties_break_on_memory():
    table = rows(("a", 100.0, 1.0, 900, True), ("b", 100.0, 1.0, 500, False))
    assert report.recommend(table, report.Metric("eval_loss", False), 0.0)["name"] == "b"


def test_recommendation_single_point_and_none():
    table = rows(("only", 100.0, 1.0, 500, True))
    rec = report.recommend(table, report.Metric("eval_loss", False), 0.01)
    assert rec["name"] == "only" and rec["ratios"]["energy"] == 0
    failed = [{"name": "x", "status": "failed", "baseline": True, "error": "boom"}]
    assert report.recommend(failed, report.Metric("eval_loss", False), 0.01) is None


def summary(name, joules, loss, peak, baseline=False, status="completed"):
    """A sweep record: the point's fields and a run summary built from the real schema."""
    run = RunSummary(
        status=status, config={"output": {"dir": f"runs/{name}"}}, time_s=2.0, tokens_per_s=100.0, mfu=0.3,
        eval=EvalSummary(loss + 0.5, loss, 4.5, 2.7, 0.1, 0.2, 100, 4),
        energy={"train_joules": joules, "method": "estimated"},
        memory={"peak_above_baseline_bytes": peak, "compare_with": "peak_above_baseline_bytes"},
    )  # fmt: skip
    return {"name": name, "key": name, "baseline": baseline, **run.to_dict()}


def test_report_files_from_a_sweep_folder(tmp_path):
    records = [
        summary("fp32", 1000.0, 2.0, 800 * 2**20, baseline=True),
        summary("bf16", 500.0, 2.01, 600 * 2**20),
        {"name": "broken", "key": "broken", "status": "failed", "config": {}, "error": "UserError: bad"},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn')
    built = report.build(tmp_path, tolerance=0.05)
    assert built["recommendation"]["name"] == "bf16"
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<img" in html and 'src="energy' not in html
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["fp32", "bf16", "broken"]
    assert table[1]["on_front"] == "True" and table[2]["error"] == "UserError: bad"
    md = (tmp_path / "report.md").read_text()
    assert "energy -50%" in md and "failed: UserError: bad" in md and "estimated" in md
    assert (tmp_path / "energy_vs_metric.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_single_run_and_of_nothing(tmp_path):
    record = summary("run", 10.0, 1.5, 2**20)
    (tmp_path / "summary.json").write_text(
        json.dumps({k: v for k, v in record.items() if k not in ("name", "key", "baseline")})
    )
    assert report.build(tmp_path)["recommendation"]["name"] == "run"
    with pytest.raises(UserError, match="no results.jsonl"):
        report.build(tmp_path / "nope")


def test_recommendation_flags_a_difference_within_seed_noise():
    table = [
        {"name": "fp32", "status": "completed", "baseline": True, "error": None, "train_joules": 100.0,
         "task_score": 0.50, "task_std": 0.04, "peak_bytes": 10, "time_s": 1.0},
        {"name": "bf16", "status": "completed", "baseline": False, "error": None, "train_joules": 50.0,
         "task_score": 0.48, "task_std": 0.03, "peak_bytes": 10, "time_s": 0.5},
    ]  # fmt: skip
    rec = report.recommend(table, report.Metric("task_score", True), tolerance=0.05)
    assert rec["name"] == "bf16" and "within seed noise: std 0.0400" in rec["text"]
    table[1]["task_std"] = table[0]["task_std"] = 0.001
    assert "seed noise" not in report.recommend(table, report.Metric("task_score", True), tolerance=0.05)["text"]


def test_a_record_that_does_not_fit_the_summary_schema_is_named(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "config": {}, "steps": "many"}))
    with pytest.raises(UserError, match="summary.json: steps = 'many' is not valid: expected an integer"):
        report.build(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(UserError, match="config missing"):
        report.build(tmp_path)
