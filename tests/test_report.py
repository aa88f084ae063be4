"""Pareto front and recommendation on synthetic points; the report files."""

import csv
import json

import pytest

from ecoadapt.core.errors import UserError
from ecoadapt.reports import builder
from ecoadapt.results.judged import HarnessResult
from ecoadapt.results.summary import EvalSummary, RunSummary
from ecoadapt.task import downstream, stats


def test_pareto_front_basic_and_ties():
    # (cost, metric) with higher metric better
    points = [(10, 0.80), (5, 0.80), (5, 0.70), (20, 0.90), (20, 0.85), (5, 0.80)]
    front = builder.pareto_front(points, higher_is_better=True)
    # (5, .80) twice (exact ties both kept), (20, .90); (10, .80) is dominated by (5, .80)
    assert front == [1, 5, 3]


def test_pareto_front_lower_is_better_and_single_point():
    assert builder.pareto_front([(3.0, 2.5)], higher_is_better=False) == [0]
    points = [(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0)]
    assert builder.pareto_front(points, higher_is_better=False) == [0, 1, 3]  # (3, 2.5) is dominated


def test_pareto_front_when_one_point_dominates_all():
    points = [(1, 0.9), (2, 0.8), (3, 0.7)]
    assert builder.pareto_front(points, higher_is_better=True) == [0]


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
    rec = builder.recommend(table, builder.Metric("eval_loss", False), tolerance=0.05)
    assert rec["name"] == "bf16"
    assert rec["ratios"]["energy"] == pytest.approx(-0.5)
    assert rec["ratios"]["peak memory"] == pytest.approx(0.0)
    assert rec["ratios"]["metric_delta"] == pytest.approx(0.02)
    assert "energy -50%" in rec["text"] and "peak memory +0%" in rec["text"]
    assert builder.recommend(table, builder.Metric("eval_loss", False), tolerance=0.5)["name"] == "lora"
    assert builder.recommend(table, builder.Metric("eval_loss", False), 0.5, objective="memory")["name"] == "lora"
    # Within 0.05 fp32 and bf16 tie on memory: the tie goes to the faster (and cheaper) one.
    assert builder.recommend(table, builder.Metric("eval_loss", False), 0.05, objective="memory")["name"] == "bf16"


def test_recommendation_ties_break_on_memory():
    table = rows(("a", 100.0, 1.0, 900, True), ("b", 100.0, 1.0, 500, False))
    assert builder.recommend(table, builder.Metric("eval_loss", False), 0.0)["name"] == "b"


def test_recommendation_single_point_and_none():
    table = rows(("only", 100.0, 1.0, 500, True))
    rec = builder.recommend(table, builder.Metric("eval_loss", False), 0.01)
    assert rec["name"] == "only" and rec["ratios"]["energy"] == 0
    failed = [{"name": "x", "status": "failed", "baseline": True, "error": "boom"}]
    assert builder.recommend(failed, builder.Metric("eval_loss", False), 0.01) is None


def summary(name, joules, loss, peak, baseline=False, status="completed"):
    """A sweep record: the point's fields and a run summary built from the real schema."""
    run = RunSummary(
        status=status, config={"output": {"dir": f"runs/{name}"}}, time_s=2.0, tokens_per_s=100.0, mfu=0.3,
        eval=EvalSummary(loss + 0.5, loss, 4.5, 2.7, 0.1, 0.2, 100, 4),
        energy={"train_joules": joules, "method": "estimated", "mj_per_token": joules / 4},
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
    built = builder.build(tmp_path, tolerance=0.05)
    assert built["recommendation"]["name"] == "bf16"
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<img" in html and 'src="energy' not in html
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["fp32", "bf16", "broken"]
    assert table[1]["on_front"] == "True" and table[2]["error"] == "UserError: bad"
    md = (tmp_path / "report.md").read_text()
    assert "energy -50%" in md and "failed: UserError: bad" in md and "estimated" in md
    assert "| mJ/token |" in md and "| 250.00 |" in md and "| 125.00 |" in md  # per training token
    assert (tmp_path / "energy_vs_metric.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_single_run_and_of_nothing(tmp_path):
    record = summary("run", 10.0, 1.5, 2**20)
    (tmp_path / "summary.json").write_text(
        json.dumps({k: v for k, v in record.items() if k not in ("name", "key", "baseline")})
    )
    assert builder.build(tmp_path)["recommendation"]["name"] == "run"
    with pytest.raises(UserError, match="no results.jsonl"):
        builder.build(tmp_path / "nope")


def task(base, adapted, joules=50.0):
    """A run's task section from per-seed scores, summarised by the real downstream code."""
    per_seed = [
        {"seed": s, "base": {"macro_f1": b, "cached": s > 0}, "adapted": {"macro_f1": a, "cached": False}}
        for s, (b, a) in enumerate(zip(base, adapted, strict=True))
    ]
    out = downstream.summarize("macro_f1", per_seed, {"test_counts": {"x": 60, "y": 40}})
    out.mode, out.energy = "finetune", {"joules": joules, "seconds": 1.0, "method": "estimated"}
    return out.to_dict()


def write_points(folder, points):
    """results.jsonl of a sweep: (name, train joules, held-out loss, task) per point."""
    records = []
    for i, (name, joules, loss, t) in enumerate(points):
        record = summary(name, joules, loss, 100 * 2**20, baseline=i == 0)
        record["task"] = t
        records.append(record)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


BASE = [0.60, 0.55, 0.65, 0.58, 0.62]


def test_a_report_without_a_detectable_gain_says_so_and_ranks_by_held_out_loss(tmp_path):
    noise = [0.012, -0.010, 0.004, -0.006, 0.001]  # adapted minus base: inside seed noise
    write_points(
        tmp_path,
        [
            ("fp32", 1000.0, 2.00, task(BASE, [b + n for b, n in zip(BASE, noise, strict=True)])),
            # The best task score, and no detectable gain either: it must not win on that score.
            ("bf16", 500.0, 2.30, task(BASE, [b + n + 0.001 for b, n in zip(BASE, noise, strict=True)])),
            ("lora", 400.0, 2.02, task(BASE, [b - n for b, n in zip(BASE, noise, strict=True)])),
        ],
    )
    built = builder.build(tmp_path, tolerance=0.05)
    assert built["metric"] == "eval_loss"
    # No detectable gain: the base model (0 J) is the recommendation; the recipe whose interval
    # reaches highest is only the next thing to try (issue 26).
    assert built["recommendation"]["name"] == "base model" and built["recommendation"]["next"] == "bf16"
    assert "No recipe's adaptation changed the task" in built["verdict"][0]
    assert "ranked by held-out domain loss" in built["verdict"][0]
    assert all("no detectable effect" in line for line in built["verdict"][1:4])
    md = (tmp_path / "report.md").read_text()
    assert md.index("**Verdict:**") < md.index("**Recommendation:**") < md.index("| point |")
    assert "adaptation 1,900 J + evaluation 150 J = 2,050 J" in md


def test_a_report_with_a_detectable_gain_ranks_by_the_task_with_retained_gain(tmp_path):
    gains = [0.040, 0.050, 0.045, 0.055, 0.050]
    kept = [0.036, 0.046, 0.040, 0.050, 0.044]  # about 90% of the baseline's, seed by seed
    write_points(
        tmp_path,
        [
            ("fp32", 1000.0, 2.00, task(BASE, [b + g for b, g in zip(BASE, gains, strict=True)])),
            ("frugal", 300.0, 2.20, task(BASE, [b + g for b, g in zip(BASE, kept, strict=True)])),
        ],
    )
    built = builder.build(tmp_path, tolerance=0.03)
    assert built["metric"] == "task_score" and built["recommendation"]["name"] == "frugal"
    assert "helped the task" in built["verdict"][0] and "for 2 of 2 recipes" in built["verdict"][0]
    expected = stats.retained_gain(dict(enumerate(kept)), dict(enumerate(gains)))
    assert expected is not None and 0.85 < expected.mean < 0.95
    rows = {r["name"]: r for r in builder.load_rows(tmp_path)[0]}
    assert rows["frugal"]["retained"] == pytest.approx(expected.mean)
    assert rows["frugal"]["retained_low"] == pytest.approx(expected.low)
    assert any(line.startswith("frugal keeps 8") or line.startswith("frugal keeps 9") for line in built["verdict"])
    # frugal vs fp32, paired by seed: -0.004, -0.004, -0.005, -0.005, -0.006; by hand: mean
    # -0.0048, std 0.000837, t(4) 2.7764 x std / sqrt(5) = 0.00104.
    assert "downstream metric -0.0048 (95% CI -0.0058 to -0.0038, 5 seeds)" in built["recommendation"]["text"]


def test_a_record_that_does_not_fit_the_summary_schema_is_named(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "config": {}, "steps": "many"}))
    with pytest.raises(UserError, match="summary.json: steps = 'many' is not valid: expected an integer"):
        builder.build(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(UserError, match="config missing"):
        builder.build(tmp_path)


def test_every_report_writes_a_compute_statement_with_adaptation_and_evaluation_apart(tmp_path):
    write_points(
        tmp_path,
        [
            ("fp32_full", 1000.0, 2.00, task(BASE, BASE, joules=300.0)),
            ("frugal", 500.0, 2.10, task(BASE, BASE, joules=100.0)),
        ],
    )
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    for r in records:
        r["config"]["measure"] = {"location": "Quebec, Canada"}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    builder.build(tmp_path)
    assert " in Quebec, Canada." in (tmp_path / "compute.md").read_text()  # measure.location
    md = (tmp_path / "compute.md").read_text()
    # 1,500 J adapting + 400 J evaluating = 1,900 J = 0.000528 kWh; at the world average 480 g/kWh.
    assert "0.000528 kWh in all (1,900 J): 0.000417 kWh adapting the models and 0.000111 kWh evaluating" in md
    assert "480 g CO2e/kWh (world average 2023" in md and "0.253 g CO2e" in md
    assert "| fp32_full | 0.001 | 0.000278 | 8.33e-05 | 100 | estimated |" in md  # 2 s of one device
    tex = (tmp_path / "compute.tex").read_text()
    assert "\\begin{tabular}{lrrrrr}" in tex and "fp32\\_full" in tex and "fp32_full" not in tex


def test_a_report_where_adaptation_hurt_says_so_and_ranks_by_held_out_loss(tmp_path):
    write_points(
        tmp_path,
        [
            ("fp32", 1000.0, 2.00, task(BASE, [b - 0.05 + 0.002 * i for i, b in enumerate(BASE)])),
            ("lora", 400.0, 2.01, task(BASE, [b - 0.01 + 0.001 * i for i, b in enumerate(BASE)])),
        ],
    )
    built = builder.build(tmp_path, tolerance=0.05)
    # Not adapting is a recipe too: it costs 0 J and beats both here (issue 26).
    assert built["metric"] == "eval_loss" and built["recommendation"]["name"] == "base model"
    text = built["recommendation"]["text"]
    assert text.startswith("the base model, not adapted (0 J of adaptation): no recipe's adaptation helped")
    # Both intervals lie below zero: no recipe of this setup is offered as the next try.
    assert "Every recipe hurt it (the closest, lora: -0.0080, 95% CI" in text
    assert built["recommendation"]["next"] is None
    assert "No recipe's adaptation helped the task (macro_f1); 2 of 2 hurt it" in built["verdict"][0]
    assert built["verdict"][1].startswith("fp32: hurt: -0.0460 (95% CI")


def test_no_detectable_gain_recommends_the_base_model_and_names_what_to_try_next(tmp_path):
    """Issue 26's hidden task: three recipes, all "no detectable effect"; the report used to
    recommend the fp32 baseline itself, the most expensive recipe."""
    write_points(
        tmp_path,
        [
            ("fp32", 1000.0, 2.00, task(BASE, [b - 0.010 + 0.004 * (i % 2) for i, b in enumerate(BASE)])),
            ("lora", 300.0, 2.10, task(BASE, [b + 0.010 - 0.012 * (i % 2) for i, b in enumerate(BASE)])),
            ("top2", 200.0, 2.20, task(BASE, [b + 0.008 - 0.011 * (i % 2) for i, b in enumerate(BASE)])),
        ],
    )
    rows = {r["name"]: r for r in builder.load_rows(tmp_path)[0]}
    assert all(r["verdict"] != "helped" for r in rows.values())
    built = builder.build(tmp_path)
    rec = built["recommendation"]
    likeliest = max(rows.values(), key=lambda r: r["gain_high"])["name"]
    assert rec["name"] == "base model" and rec["next"] == likeliest != "fp32"
    assert (
        "adapting did not pay here" in rec["text"]
        and "**Recommendation:** the base model" in (tmp_path / "report.md").read_text()
    )


def target(loss, reached, step=None, joules=None, best=None, steps=40):
    return {"loss": loss, "reached": reached, "step": step, "tokens": None, "train_joules": joules,
            "eval_loss": None, "best_eval_loss": best, "steps_run": steps}  # fmt: skip


def test_an_equal_quality_sweep_ranks_by_joules_to_the_baselines_loss(tmp_path):
    records = [
        {**summary("fp32", 1000.0, 2.00, 800 * 2**20, baseline=True), "steps": 40},
        {**summary("bf16", 450.0, 1.99, 600 * 2**20), "steps": 44, "target": target(2.0, True, 44, 450.0, 1.99)},
        # Cheapest at equal steps, but slower to learn: 2.3x the baseline's joules to get there.
        # Its final loss is the lowest (it went past the target within its last evaluations), but
        # every point that reached the target is of the baseline's quality: it is not "better".
        {**summary("lora", 2300.0, 1.90, 300 * 2**20), "steps": 120, "target": target(2.0, True, 120, 2300.0, 1.9)},
        {**summary("top2", 900.0, 2.40, 200 * 2**20), "steps": 160, "target": target(2.0, False, best=2.4, steps=160)},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    built = builder.build(tmp_path, tolerance=0.05)
    rec = built["recommendation"]
    assert rec["name"] == "bf16"  # the fewest joules to the target; top2 never got there: not a candidate
    assert "energy -55%" in rec["text"]  # 450 J against the baseline's 1,000 J to the same loss
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("**Equal quality**") : md.index("| point |")]
    assert "held-out loss 2.0000, the baseline's" in section
    assert section.index("- bf16: 450 J in 44 steps, 0.45x") < section.index("- fp32: 1,000 J in 40 steps, 1.00x")
    assert section.index("- fp32") < section.index("- lora: 2,300 J in 120 steps, 2.30x")
    assert "- top2: never reached it within its cap (160 steps; best 2.4000)" in section


def _harness(base_items, adapted_items, joules=30.0):
    """summary.json's harness part for one task judged on these per-item scores (real summarize)."""
    from ecoadapt.task import harness

    def scores(items):
        values = {str(i): float(v) for i, v in enumerate(items)}
        return {"metric": "acc", "higher_is_better": True, "value": sum(items) / len(items), "items": values}

    rows_ = harness.summarize({"stance": scores(base_items)}, {"stance": scores(adapted_items)})
    result = HarnessResult(harness_version="0.4.13", tasks=rows_, energy={"joules": joules, "seconds": 1.0})
    return result.to_dict()


def test_decoders_judged_by_the_harness_alone_are_ranked_and_recommended_on_it(tmp_path):
    base = [0, 1] * 50  # 100 items, half right
    helped = [1] * 80 + [0, 1] * 10  # 90 right: a paired gain well beyond the items' noise
    small = [1] * 40 + [0, 1] * 30  # 70 right
    records = []
    for i, (name, joules, items, change) in enumerate(
        [("lora", 1000.0, helped, 0.30), ("qlora", 600.0, small, 0.02), ("frugal", 300.0, base, 0.0)]
    ):
        record = summary(name, joules, 2.0 + i / 100, 100 * 2**20, baseline=i == 0)
        record["harness"] = _harness(base, items)
        record["eval"]["general"] = {
            "sources": ["builtin:general-english"], "blocks": 16, "target_tokens": 2000, "loss_before": 3.0,
            "loss": 3.0 + change, "change": change, "ci_low": change - 0.01, "ci_high": change + 0.01, "batches": 16,
            "verdict": "forgot" if change > 0.01 else "no detectable change", "verdict_text": "",
        }  # fmt: skip
        records.append(record)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    points = [{"name": r["name"], "key": r["key"], "baseline": r["baseline"]} for r in records]
    report = {"tolerance": 0.1, "max_general_loss_increase": 0.1}
    (tmp_path / "sweep.json").write_text(json.dumps({"report": report, "points": points}))
    rows_ = {r["name"]: r for r in builder.load_rows(tmp_path)[0]}
    assert rows_["lora"]["task_score"] == pytest.approx(0.9) and rows_["lora"]["verdict"] == "helped"
    assert rows_["lora"]["harness_task"] == "stance acc" and rows_["frugal"]["verdict"] == "no detectable effect"
    assert rows_["qlora"]["eval_joules"] == 30.0  # the harness's window is the evaluation's energy
    built = builder.build(tmp_path)
    assert built["metric"] == "task_score"  # ranked on the harness
    # lora scores best but its general-text loss rose 0.30 > 0.1: of the others, qlora is best.
    assert built["recommendation"]["name"] == "qlora"
    assert "rose by at most 0.1 nats" in built["recommendation"]["text"]
    unbounded = builder.recommend(list(rows_.values()), builder.Metric("task_score", True), 0.1)
    assert unbounded is not None and unbounded["name"] == "lora"
    assert any(n.startswith("General text (forgetting") and "Least: frugal" in n for n in built["notes"])
