"""task.harness: the evaluation harness judges a decoder by log-likelihood, base and adapted
paired by item, base cached, resumable, and every bad input a one-line error before training."""

import json
import re

import pytest
import torch

from ecoadapt.cli import main
from ecoadapt.config import RunConfig
from ecoadapt.core.errors import UserError
from ecoadapt.task import harness
from helpers.harness_task import write_domain
from helpers.runs import write_config

pytest.importorskip("lm_eval", reason="needs the harness extra: pip install -e '.[harness]'")

TRAIN = {"max_steps": 16, "micro_batch_size": 8, "lr": 1e-2, "log_every": 8}


def _config(tmp_path, model, task_yaml, corpus, **sections):
    sections = {"task": {"harness": [str(task_yaml)]}, "train": TRAIN, **sections}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path, model, corpus, **sections)
    raw = path.read_text().replace("text_field: caption", "text_field: text")
    path.write_text(raw)
    return path


def test_a_decoder_adapted_to_its_domain_is_judged_helped_by_the_harness_paired_by_item(tmp_path, tiny_llama, capsys):
    corpus, task = write_domain(tmp_path / "domain")
    config = _config(tmp_path, tiny_llama, task, corpus)
    assert main(["adapt", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    h = summary["harness"]
    assert h["harness_version"] and h["fewshot"] == 0 and h["precision"] == "fp32"
    [row] = h["tasks"]
    assert row["name"] == "holding" and row["metric"] == "acc" and row["items"] == 40
    # The corpus always follows "holding" with "bottle": the adapted model learnt it.
    assert row["adapted"] > 0.9 and row["adapted"] - row["base"] > 0.3
    gain = row["gain"]
    assert gain["n"] == 40 and gain["ci_low"] > 0 and gain["mean"] == pytest.approx(row["adapted"] - row["base"])
    assert row["verdict"] == "helped" and "40 items" in row["verdict_text"]
    assert row["base_stderr"] is not None and row["adapted_stderr"] is not None
    assert h["evaluation_joules"] > 0 and summary["energy"]["phases"]["harness"]["joules"] > 0
    out = capsys.readouterr().out
    assert "harness holding acc (0-shot): base" in out and "helped" in out
    judging = summary["energy"]["phases"]["harness"]["joules"]
    assert f"{judging:,.0f} J judging ({judging / summary['energy']['joules']:.0%} of all)" in out


@pytest.mark.slow
def test_the_base_models_harness_results_are_computed_once(tmp_path, tiny_llama, capsys):
    corpus, task = write_domain(tmp_path / "domain")
    first = _config(tmp_path / "a", tiny_llama, task, corpus)
    assert main(["adapt", str(first)]) == 0
    second = _config(tmp_path / "b", tiny_llama, task, corpus, lora={"enabled": True, "r": 4})
    assert main(["adapt", str(second)]) == 0
    a, b = (json.loads((tmp_path / x / "run" / "summary.json").read_text())["harness"] for x in ("a", "b"))
    assert not a["base_cached"] and b["base_cached"]
    assert a["tasks"][0]["base"] == b["tasks"][0]["base"]
    printed = capsys.readouterr()
    assert "harness base: cached" in printed.out + printed.err


@pytest.mark.slow
def test_the_harness_judges_the_saved_adapter_as_it_judged_the_model_in_memory(tmp_path, tiny_llama):
    corpus, task = write_domain(tmp_path / "domain")
    config = _config(tmp_path, tiny_llama, task, corpus, lora={"enabled": True, "r": 4})
    assert main(["adapt", str(config)]) == 0
    in_run = json.loads((tmp_path / "run" / "summary.json").read_text())["harness"]["tasks"][0]
    assert main(["evaluate", str(config)]) == 0
    from_disk = json.loads((tmp_path / "run" / "harness.json").read_text())["tasks"][0]
    assert from_disk["adapted"] == pytest.approx(in_run["adapted"])
    assert from_disk["gain"]["mean"] == pytest.approx(in_run["gain"]["mean"])


def test_a_killed_judgement_keeps_the_models_it_scored(tmp_path, tiny_llama):
    """The record of a model scored before the kill is read back, not scored again."""
    corpus, task = write_domain(tmp_path / "domain")
    cfg = RunConfig.from_yaml(
        _config(tmp_path, tiny_llama, task, corpus, task={"harness": [str(task)], "cache": False})
    )
    from ecoadapt.model import pretrained

    loaded = pretrained.load(cfg.model, 16)
    record = tmp_path / "harness.jsonl"
    first = harness.compare(cfg, loaded.tokenizer, None, torch.device("cpu"), record_file=record)
    scored = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["model"] for r in scored] == ["base"]
    # An earlier attempt's record with a distinctive score is what the rerun reports.
    scored[0]["scores"]["holding"]["value"] = 0.123
    record.write_text(json.dumps(scored[0]) + "\n")
    again = harness.compare(cfg, loaded.tokenizer, None, torch.device("cpu"), record_file=record)
    assert first.tasks[0].base != 0.123 and again.tasks[0].base == 0.123
    assert again.resumed_records and again.evaluation_joules == 0.0


@pytest.mark.slow
def test_a_qlora_decoder_is_judged_on_its_dequantized_base_plus_adapter(tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes")
    corpus, task = write_domain(tmp_path / "domain")
    config = _config(tmp_path, tiny_llama, task, corpus, lora={"enabled": True, "r": 4, "quantize": "int8"})
    assert main(["adapt", str(config)]) == 0
    row = json.loads((tmp_path / "run" / "summary.json").read_text())["harness"]["tasks"][0]
    assert row["gain"]["n"] == 40 and row["adapted"] is not None
    assert main(["evaluate", str(config)]) == 0  # from the saved adapter on a base quantized as in the run
    from_disk = json.loads((tmp_path / "run" / "harness.json").read_text())["tasks"][0]
    assert from_disk["adapted"] == pytest.approx(row["adapted"], abs=0.05)


def test_paired_differences_follow_the_metrics_direction():
    base = {"t": {"metric": "acc", "higher_is_better": True, "value": 0.5, "items": {str(i): i % 2 for i in range(8)}}}
    better = {"t": {**base["t"], "value": 1.0, "items": dict.fromkeys(map(str, range(8)), 1)}}
    [row] = harness.summarize(base, better)
    assert row.gain is not None and row.gain.mean == pytest.approx(0.5) and row.gain.n == 8
    assert row.verdict == "helped"
    lower = {"t": {**base["t"], "higher_is_better": False}}
    lower_after = {"t": {**better["t"], "higher_is_better": False}}
    [row] = harness.summarize(lower, lower_after)  # a metric that should fall rose: hurt
    assert row.gain is not None and row.gain.mean == pytest.approx(-0.5) and row.verdict == "hurt"
    unpaired = {"t": {**base["t"], "items": {}}}
    [row] = harness.summarize(unpaired, {"t": {**better["t"], "items": {}}})
    assert row.gain is None and row.verdict_text is not None and "not paired" in row.verdict_text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("missing.yaml", r"task\.harness: .*missing\.yaml: no such task file"),
        ("not_a_task_anywhere", r"task\.harness: 'not_a_task_anywhere' is neither a task YAML file nor a task"),
        ("bad.yaml", r"task\.harness: .*bad\.yaml: its data file nowhere\.jsonl is not there"),
        ("notask.yaml", r"task\.harness: .*notask\.yaml: names no task"),
    ],
)
def test_a_task_the_harness_cannot_load_is_one_line_before_training(tmp_path, tiny_llama, entry, message, capsys):
    corpus, task = write_domain(tmp_path / "domain")
    (tmp_path / "domain" / "bad.yaml").write_text(task.read_text().replace("items.jsonl", "nowhere.jsonl"))
    (tmp_path / "domain" / "notask.yaml").write_text("dataset_path: json\n")
    target = str(tmp_path / "domain" / entry) if entry.endswith(".yaml") else entry
    config = _config(tmp_path, tiny_llama, target, corpus)
    assert main(["adapt", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err  # one line, no traceback
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_harness_refuses_an_encoder_before_its_run_folder_exists(tmp_path, tiny_bert, capsys):
    corpus, task = write_domain(tmp_path / "domain")
    config = _config(tmp_path, tiny_bert, task, corpus)
    assert main(["adapt", str(config)]) == 2
    assert "task.harness: the harness judges decoders" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_relative_harness_file_is_read_from_the_configs_folder(tmp_path, tiny_llama, monkeypatch):
    corpus, task = write_domain(tmp_path / "domain")
    config = _config(tmp_path, tiny_llama, "domain/holding.yaml", corpus, train={**TRAIN, "max_steps": 2})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["adapt", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["task"]["harness"] == [str(task)]
    assert summary["harness"]["tasks"][0]["items"] == 40


def test_without_the_package_the_harness_says_how_to_install_it(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(UserError, match=r"pip install 'ecoadapt\[harness\]'"):
        harness.lm_eval()


def test_a_registry_task_whose_data_is_not_cached_offline_is_one_line_naming_why(monkeypatch):
    """HF_HUB_OFFLINE=1 (set for every test): nothing is fetched, and the error says so, also
    where datasets and the hub client were imported before the variable was set (they read it
    once, then: a notebook's case, and this test session's)."""
    import datasets.config
    import huggingface_hub.constants

    from ecoadapt.config import TaskConfig

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as imported while online
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=r"task\.harness: arc_easy: the harness cannot load it \(.*Offline"):
        harness.check(TaskConfig(harness=["arc_easy"]))


def test_a_signal_stops_the_harness_between_models_with_the_base_recorded(tmp_path, tiny_llama):
    corpus, task = write_domain(tmp_path / "domain")
    config = _config(tmp_path, tiny_llama, task, corpus, task={"harness": [str(task)], "cache": False})
    cfg = RunConfig.from_yaml(config)
    from ecoadapt.model import pretrained

    loaded = pretrained.load(cfg.model, 16)
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    record = tmp_path / "harness.jsonl"
    asked = []

    def stop():  # SIGTERM arrives while the base is scored: asked again before the adapted model
        asked.append(1)
        return "SIGTERM" if len(asked) > 1 else None

    with pytest.raises(harness.HarnessStopped, match="SIGTERM: the harness stopped between models"):
        harness.compare(cfg, loaded.tokenizer, weights, torch.device("cpu"), record_file=record, stop=stop)
    assert [json.loads(line)["model"] for line in record.read_text().splitlines()] == ["base"]
    done = harness.compare(cfg, loaded.tokenizer, weights, torch.device("cpu"), record_file=record)
    gain = done.tasks[0].gain
    assert gain is not None and gain.n == 40 and len(done.resumed_records) == 1
