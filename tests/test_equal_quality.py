"""Recipes compared at equal quality (issue 26): train.target_loss, and a sweep whose points train
until they reach the baseline's held-out loss, ranked by the joules it took."""

import json

import pytest
import yaml

from ecoadapt.cli import main
from ecoadapt.train.early_stop import TargetLoss
from helpers.runs import adapt_summary


def test_a_target_is_reached_once_and_says_what_it_took():
    target = TargetLoss(2.0)
    assert [target.check(s, loss, 100 * s, 10.0 * s) for s, loss in [(2, 3.0), (4, 2.5), (6, 1.9), (8, 1.5)]] == [
        False, False, True, False,
    ]  # fmt: skip
    assert target.summary(8) == {
        "loss": 2.0, "reached": True, "step": 6, "tokens": 600, "train_joules": 60.0, "eval_loss": 1.9,
        "best_eval_loss": 1.5, "steps_run": 8,
    }  # fmt: skip
    missed = TargetLoss(1.0)
    missed.check(2, 3.0, 200, 20.0)
    assert missed.summary(2) == {"loss": 1.0, "reached": False, "best_eval_loss": 3.0, "steps_run": 2}


def sets(tmp_path, model, corpus, **more):
    return {
        "model.name_or_path": model, "data.train": corpus, "data.text_field": "caption", "data.max_seq_len": 16,
        "train.micro_batch_size": 4, "train.lr": 5e-3, "train.log_every": 2, "measure.energy": "estimate",
        "measure.forecast": False, "output.save_model": False, "output.dir": tmp_path / "run", **more,
    }  # fmt: skip


def test_a_run_stops_at_its_target_loss_and_records_the_joules_to_it(tmp_path, tiny_llama, corpus_jsonl):
    first = adapt_summary(tmp_path, sets(tmp_path, tiny_llama, corpus_jsonl, **{"train.max_steps": 12}))
    start, end = first["eval"]["loss_before"], first["eval"]["loss"]
    assert end < start  # the tiny model learns: a target between the two is reachable
    goal = (start + end) / 2
    more = {"train.max_steps": 40, "train.eval_every": 2, "train.target_loss": goal, "output.dir": tmp_path / "t"}
    s = adapt_summary(tmp_path, sets(tmp_path, tiny_llama, corpus_jsonl, **more))
    assert s["stopped_by"] == "target_loss" and s["status"] == "completed"
    t = s["target"]
    assert t["reached"] and t["step"] == s["steps"] < 40 and t["step"] % 2 == 0 and t["eval_loss"] <= goal
    assert t["tokens"] == s["tokens"] and 0 < t["train_joules"] <= s["energy"]["train_joules"]
    metrics = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert evals[-1] == t["eval_loss"] and all(loss > goal for loss in evals[:-1])  # the first that reached it

    never = {"train.max_steps": 4, "train.eval_every": 2, "train.target_loss": 0.01, "output.dir": tmp_path / "n"}
    s = adapt_summary(tmp_path, sets(tmp_path, tiny_llama, corpus_jsonl, **never))
    assert s["stopped_by"] is None and s["steps"] == 4
    assert s["target"] == {
        "loss": 0.01,
        "reached": False,
        "best_eval_loss": s["target"]["best_eval_loss"],
        "steps_run": 4,
    }


def test_an_equal_loss_sweep_trains_each_point_to_the_baselines_loss(tmp_path, tiny_llama, corpus_jsonl):
    spec = {
        "base": {
            "model": {"name_or_path": str(tiny_llama)},
            "data": {"train": [str(corpus_jsonl)], "text_field": "caption", "max_seq_len": 16, "eval_fraction": 0.1},
            "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 5e-3, "log_every": 2},
            "measure": {"energy": "estimate", "forecast": False},
            "output": {"save_model": False},
        },
        "points": [
            {"name": "faster", "set": {"train.lr": 1e-2}},
            {"name": "frozen-but-top", "set": {"train.trainable_layers": 1, "train.lr": 1e-4}},
        ],
        "compare": "equal_loss",
        "cap": 2,
        "output": {"dir": str(tmp_path / "sweep")},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    records = [json.loads(x) for x in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["baseline", "faster", "frozen-but-top"]  # the baseline first
    goal = records[0]["eval"]["loss"]
    for r in records[1:]:
        train = r["config"]["train"]
        assert train["target_loss"] == goal and train["max_steps"] == 12 and train["eval_every"] == 1
        assert r["target"]["loss"] == goal and r["steps"] <= 12
        assert r["target"]["reached"] == (r["stopped_by"] == "target_loss")
    slow = records[2]
    assert not slow["target"]["reached"] and slow["steps"] == 12  # 1e-4 on one block: never gets there
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert f"**Equal quality** (held-out loss {goal:.4f}, the baseline's)" in md
    assert "- frozen-but-top: never reached it within its cap (12 steps" in md


def test_an_equal_loss_sweep_whose_baseline_failed_records_why_the_others_did_not_run(
    tmp_path, tiny_llama, corpus_jsonl
):
    spec = {
        "base": {
            "model": {"name_or_path": str(tiny_llama)},
            "data": {"train": [str(corpus_jsonl)], "text_field": "caption", "max_seq_len": 16},
            "train": {"max_steps": 2, "micro_batch_size": 4},
            "measure": {"energy": "estimate", "forecast": False},
            "output": {"save_model": False},
        },
        "points": [{"name": "lora", "set": {"lora.enabled": True}}],
        "baseline": {"train.trainable_layers": 5},  # the tiny model has 2 blocks: it fails
        "compare": "equal_loss",
        "output": {"dir": str(tmp_path / "sweep")},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 1  # nothing completed
    records = [json.loads(x) for x in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in records] == [("baseline", "failed"), ("lora", "failed")]
    assert "only 2 blocks" in records[0]["error"]
    assert records[1]["error"] == "compare: equal_loss: the baseline has no finished result to set the target"
    assert "lora" in (tmp_path / "sweep" / "report.md").read_text()  # the report still says what happened


def test_bad_equal_quality_and_tracker_settings_name_their_key(tmp_path):
    from ecoadapt.commands import sweep
    from ecoadapt.config import RunConfig
    from ecoadapt.core.errors import UserError

    raw = {"model": {"name_or_path": "m"}, "data": {"train": ["c.txt"]}}
    with pytest.raises(UserError, match="train.target_loss = 2.0 is not valid: needs train.eval_every"):
        RunConfig.from_mapping({**raw, "train": {"target_loss": 2.0}})
    with pytest.raises(UserError, match=r"train.target_loss = -1.0 is not valid: must be positive"):
        RunConfig.from_mapping({**raw, "train": {"target_loss": -1.0, "eval_every": 5}})
    with pytest.raises(UserError, match=r"log.to"):
        RunConfig.from_mapping({**raw, "log": {"to": ["tensorbord"]}})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": raw, "points": [{"name": "a", "set": {"train.lr": 1e-3}}],
                                    "compare": "equal_loss", "cap": 0.5}))  # fmt: skip
    with pytest.raises(UserError, match=r"cap = 0.5: with compare: equal_loss it must be at least 1"):
        sweep.load(path)
    path.write_text(yaml.safe_dump({"base": raw, "points": [{"name": "a", "set": {}}], "compare": "equal_quality"}))
    with pytest.raises(UserError, match=r"compare"):
        sweep.load(path)
