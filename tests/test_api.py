"""The public Python API: configs in every form, typed results, and the CLI as a layer over it."""

import json

import pytest
import yaml

import ecoadapt
from ecoadapt.cli import main
from ecoadapt.core.errors import UserError
from ecoadapt.results.judged import Judgement, TaskResult
from helpers.runs import write_config


def test_a_config_resolves_from_an_object_a_mapping_a_path_and_a_preset(tmp_path):
    raw = {"model": {"name_or_path": "m"}, "data": {"train": ["c.txt"]}, "train": {"max_steps": 7}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    from_path = ecoadapt.resolve(path, ["train.lr=0.002"])
    from_mapping = ecoadapt.resolve(raw, ["train.lr=0.002"])
    from_object = ecoadapt.resolve(from_mapping.cfg)
    assert from_path.cfg == from_mapping.cfg == from_object.cfg
    assert from_path.cfg.train.max_steps == 7 and from_path.cfg.train.lr == 0.002
    assert from_path.base == tmp_path and from_mapping.base is None
    assert "lr" not in raw["train"]  # the caller's mapping is not changed
    assert ecoadapt.resolve("quickstart").path.name == "quickstart.yaml"  # a shipped preset, by name
    assert ecoadapt.Config.from_yaml(path) == ecoadapt.resolve(path).cfg


def test_bad_configs_are_user_errors_that_name_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match=r"train\.max_step.*train\.max_steps"):
        ecoadapt.resolve({"train": {"max_step": 3}})
    with pytest.raises(UserError, match="no such config file or preset"):
        ecoadapt.resolve("no-such-preset")
    with pytest.raises(UserError, match="not int"):
        ecoadapt.resolve(3)  # type: ignore[arg-type]


def test_a_run_summary_reads_back_from_its_folder_or_says_why_not(tmp_path):
    with pytest.raises(UserError, match="no summary.json there"):
        ecoadapt.RunSummary.from_dir(tmp_path)
    (tmp_path / "summary.json").write_text('{"status": "completed", "conf')  # torn by a kill
    with pytest.raises(UserError, match="cannot read it as a summary"):
        ecoadapt.RunSummary.from_dir(tmp_path)
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="a summary is a JSON object"):
        ecoadapt.RunSummary.from_dir(tmp_path)
    assert main(["report", str(tmp_path)]) == 2  # one line, no traceback


def test_adapt_from_python_returns_the_summary_it_wrote_and_report_reads_it(tmp_path, tiny_llama, corpus_jsonl):
    cfg = yaml.safe_load(write_config(tmp_path, tiny_llama, corpus_jsonl).read_text())
    summary = ecoadapt.adapt(cfg, ["train.max_steps=6", "lora.enabled=true"])
    assert isinstance(summary, ecoadapt.RunSummary) and summary.status == "completed" and summary.steps == 6
    assert summary.to_dict() == ecoadapt.RunSummary.from_dir(tmp_path / "run").to_dict()
    assert summary.config["lora"]["enabled"] is True
    assert summary.forecast is not None and summary.forecast["source"] == "the run's own first 5 steps"
    report = ecoadapt.report(tmp_path / "run")
    assert isinstance(report, ecoadapt.Report) and report.folder == tmp_path / "run"
    assert (tmp_path / "run" / "report.md").read_text().count("|") > 4 and report.table in (
        tmp_path / "run" / "report.md"
    ).read_text()
    assert report.recommendation_text  # a sentence, whether or not a point was recommended


def test_every_command_goes_through_the_api(tmp_path, monkeypatch, capsys):
    """The CLI parses and prints; what runs is the API's (a notebook gets the same behaviour)."""
    calls = []

    def fake_evaluate(config, overrides=()):
        calls.append((config, list(overrides)))
        energy = {"seconds": 1.0, "joules": 2.0, "method": "estimated", "meter": "cpu-time"}
        return Judgement(task=TaskResult(metric="accuracy", mode="probe", base=0.5, energy=energy))

    monkeypatch.setattr(ecoadapt.api, "evaluate", fake_evaluate)
    assert main(["evaluate", "cfg.yaml", "--set", "task.seeds=[0]"]) == 0
    assert calls == [("cfg.yaml", ["task.seeds=[0]"])]
    printed = capsys.readouterr().out
    assert "task accuracy (probe): base 0.5000" in printed and "evaluation: 1.0 s, 2 J (estimated, cpu-time)" in printed


def test_a_launched_job_that_wrote_no_summary_keeps_its_exit_status(tmp_path, monkeypatch):
    """Under torchrun the ranks print their own errors; the launcher's status is the command's."""
    from ecoadapt.model import parallel

    monkeypatch.setattr(parallel, "launch", lambda nproc, argv: 143)
    cfg = {
        "model": {"name_or_path": "m"},
        "data": {"train": ["c.txt"]},
        "parallel": {"nproc": 2, "strategy": "ddp"},
        "output": {"dir": str(tmp_path / "out")},
    }
    with pytest.raises(ecoadapt.api.JobFailed) as failed:
        ecoadapt.adapt(cfg)
    assert failed.value.exit_code == 143 and "before writing" in str(failed.value)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["adapt", str(path)]) == 143


def test_the_readmes_api_example_names_only_what_exists():
    import ast
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", section.index("```python"))]
    ast.parse(code)  # it is Python
    names = set(re.findall(r"\becoadapt\.([A-Za-z_]+)", code))
    assert {"adapt", "sweep", "plan", "evaluate", "report", "Config", "RunSummary"} <= names
    assert all(hasattr(ecoadapt, name) for name in names), names - set(dir(ecoadapt))
