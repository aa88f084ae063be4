"""Sweeps: expansion, isolated runs, resume, failures."""

import json

import pytest
import yaml

from ecoadapt.cli import main
from ecoadapt.commands import sweep
from ecoadapt.core.errors import UserError


def write_sweep(tmp_path, model, corpus, **extra):
    spec = {
        "base": {
            "model": {"name_or_path": str(model)},
            "data": {"train": [str(corpus)], "text_field": "caption", "max_seq_len": 16, "eval_fraction": 0.1},
            "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 5e-3, "log_every": 3},
            "measure": {"energy": "estimate"},
            "output": {"save_model": False},
        },
        "grid": {"lora.enabled": [False, True]},
        "points": [{"name": "top-block", "set": {"train.trainable_layers": 1}}],
        "output": {"dir": str(tmp_path / "sweep")},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expansion_dedupes_the_baseline_and_checks_every_point(tmp_path):
    path = write_sweep(tmp_path, "m", "c.txt")
    spec = sweep.load(path)
    assert [p.name for p in spec.points] == ["enabled=False", "enabled=True", "top-block"]
    assert [p.baseline for p in spec.points] == [True, False, False]  # fp32 full = the first grid point
    assert len({p.key for p in spec.points}) == 3
    bad = write_sweep(tmp_path, "m", "c.txt", points=[{"name": "oops", "set": {"train.lrr": 1}}])
    with pytest.raises(UserError, match=r"point 'oops'.*unknown key 'train\.lrr'"):
        sweep.load(bad)
    with pytest.raises(UserError, match="unknown key 'gird' \\(did you mean 'grid'\\?\\)"):
        path.write_text(yaml.safe_dump({"gird": {}}))
        sweep.load(path)


def test_the_report_section_is_checked_against_its_schema(tmp_path):
    with pytest.raises(UserError, match="unknown key 'report.tolerence' \\(did you mean 'report.tolerance'"):
        sweep.load(write_sweep(tmp_path, "m", "c.txt", report={"tolerence": 0.1}))
    with pytest.raises(
        UserError, match="report.objective = 'joules' is not valid: expected one of energy, time, memory"
    ):
        sweep.load(write_sweep(tmp_path, "m", "c.txt", report={"objective": "joules"}))
    spec = sweep.load(write_sweep(tmp_path, "m", "c.txt", report={"tolerance": "1e-2", "objective": "memory"}))
    assert (spec.report.tolerance, spec.report.objective) == (0.01, "memory")


def test_three_point_sweep_runs_resumes_and_records_failures(tmp_path, tiny_llama, corpus_jsonl, capsys):
    path = write_sweep(tmp_path, tiny_llama, corpus_jsonl)
    assert main(["sweep", str(path)]) == 0
    out = tmp_path / "sweep"
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["completed"] * 3
    assert all(r["energy"]["method"] == "estimated" for r in records)
    for name in ("report.md", "report.html", "results.csv", "energy_vs_metric.png"):
        assert (out / name).exists()
    printed = capsys.readouterr()
    assert "recommendation:" in printed.out and "point 3/3" in printed.err

    # Again: every point is done, nothing runs.
    assert main(["sweep", str(path)]) == 0
    assert "3 of 3 points already done: skipped" in capsys.readouterr().err
    assert len((out / "results.jsonl").read_text().splitlines()) == 3

    # A failing point (2 blocks only) is recorded, and the others still run.
    points = [{"name": "too-many", "set": {"train.trainable_layers": 5}}, {"name": "more", "set": {"train.lr": 1e-3}}]
    path = write_sweep(tmp_path, tiny_llama, corpus_jsonl, points=points)
    assert main(["sweep", str(path)]) == 1  # the report is written, but not every point finished
    assert "not every point finished (too-many)" in capsys.readouterr().err
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by_name = {r["name"]: r for r in records}
    assert by_name["too-many"]["status"] == "failed"
    assert "only 2 blocks" in by_name["too-many"]["error"]
    assert by_name["more"]["status"] == "completed"
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4  # header + enabled=False, enabled=True, too-many, more


@pytest.mark.slow
def test_a_sweep_fine_tunes_the_base_once_and_every_point_shares_it(tmp_path, tiny_bert, corpus_jsonl, capfd):
    from helpers.tiny_models import write_task

    task = {"train": [str(write_task(tmp_path / "task.jsonl", 120))], "seeds": [0, 1], "epochs": 1}
    path = write_sweep(tmp_path, tiny_bert, corpus_jsonl, grid={}, points=[{"name": "a"}, {"name": "b"}])
    spec = yaml.safe_load(path.read_text())
    spec["base"]["task"] = task
    spec["points"][1]["set"] = {"train.lr": 1e-3}
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    records = [json.loads(x) for x in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    first, second = (r["task"] for r in records)
    assert [r["base"]["cached"] for r in first["per_seed"]] == [False, False]
    assert [r["base"]["cached"] for r in second["per_seed"]] == [True, True]
    assert second["base_cached"] == 2 and [r["base"]["macro_f1"] for r in second["per_seed"]] == [
        r["base"]["macro_f1"] for r in first["per_seed"]
    ]
    # The second point paid for its two adapted fine-tunes only: the cached base scores carry
    # the joules they once cost, and the point's total leaves them out. (Sums, not a ratio of
    # timings: on a shared CI machine tiny fine-tunes' estimated joules vary by 2x.)
    assert all(r["base"]["joules"] > 0 for r in second["per_seed"])
    assert first["evaluation_joules"] == pytest.approx(
        sum(r["base"]["joules"] + r["adapted"]["joules"] for r in first["per_seed"])
    )
    assert second["evaluation_joules"] == pytest.approx(sum(r["adapted"]["joules"] for r in second["per_seed"]))
    assert capfd.readouterr().err.count("(cached: computed once before") == 2
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "**Verdict:**" in md and "evaluation energy (J)" in md


@pytest.mark.parametrize("results_fit", [True, False], ids=["results-line-fits", "results-line-too"])
def test_a_point_stopped_by_a_full_disk_stops_the_sweep_with_its_one_line(tmp_path, monkeypatch, capfd, results_fit):
    """The point's child prints the disk-full line as it dies; the sweep must not say it again
    (when results.jsonl cannot be written either) nor run the next point into the same disk."""
    import errno
    import sys

    from ecoadapt.core import storage
    from ecoadapt.core.errors import disk_full_message

    line = f"ecoadapt: error: {disk_full_message('a file')}"
    ran = []

    def child_on_a_full_disk(cfg, run_dir, **kwargs):
        ran.append(run_dir.name)
        print(line, file=sys.stderr)  # what the real child streams through the sweep's stderr
        return {"status": "failed", "config": cfg, "error": line}

    real_append = storage.append_jsonl

    def append(path, record):
        if path.name == "results.jsonl" and not results_fit:
            raise OSError(errno.EFBIG, "File too large", str(path))
        return real_append(path, record)

    monkeypatch.setattr(sweep, "run_adapt", child_on_a_full_disk)
    monkeypatch.setattr(storage, "append_jsonl", append)
    assert main(["sweep", str(write_sweep(tmp_path, "m", "c.txt"))]) == 2
    err = capfd.readouterr().err
    assert [x for x in err.splitlines() if x.startswith("ecoadapt")] == [line]
    assert len(ran) == 1  # the points after it were not run into the same full disk
    results = tmp_path / "sweep" / "results.jsonl"
    assert results.exists() == results_fit  # recorded where it could be: the rerun retries the point
    if results_fit:
        assert json.loads(results.read_text())["status"] == "failed"
