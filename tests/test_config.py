"""Config loading, overrides, and the errors a user meets."""

import dataclasses
from pathlib import Path

import pytest

from ecoadapt import config
from ecoadapt.cli import keys_help
from ecoadapt.config.presets import preset_names, resolve_config
from ecoadapt.core.errors import UserError

BASE = "model:\n  name_or_path: m\ndata:\n  train: [c.txt]\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, BASE + "train:\n  lr: 1e-4\n  max_steps: 7\n")
    cfg = config.load(path, ["train.grad_accum=4", "lora.enabled=true", "train.trainable_layers=2"])
    assert cfg.train.lr == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string; we accept it
    assert cfg.train.max_steps == 7
    assert cfg.train.grad_accum == 4
    assert cfg.lora.enabled is True
    assert cfg.train.trainable_layers == 2
    assert cfg.data.train == ["c.txt"]


def test_single_string_becomes_a_list(tmp_path):
    cfg = config.load(None, ["model.name_or_path=m", "data.train=a/*.txt"])
    assert cfg.data.train == ["a/*.txt"]


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train\.lrr'.*did you mean 'train\.lr'"):
        config.load(write(tmp_path, BASE + "train:\n  lrr: 0.1\n"))


def test_unknown_section_names_the_closest(tmp_path):
    with pytest.raises(UserError, match=r"unknown section 'trian'.*'train'"):
        config.load(write(tmp_path, BASE + "trian:\n  lr: 0.1\n"))


def test_unknown_override_key():
    with pytest.raises(UserError, match=r"--set.*unknown key 'data\.max_seq'.*data\.max_seq_len"):
        config.load(None, ["model.name_or_path=m", "data.train=x", "data.max_seq=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=-3", r"train\.max_steps = -3 is not valid: must be at least 1"),
        ("train.max_steps=abc", r"train\.max_steps = 'abc' is not valid: expected an integer or null"),
        ("precision.mode=fp8", r"precision\.mode = 'fp8' is not valid: expected one of fp32"),
        ("data.eval_fraction=1.5", r"data\.eval_fraction = 1\.5 is not valid"),
        ("lora.enabled=maybe", r"lora\.enabled = 'maybe' is not valid: expected true or false"),
        ("train.trainable_layers=0", r"train\.trainable_layers = 0 is not valid"),
    ],
)
def test_bad_values_name_key_and_expectation(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        config.load(write(tmp_path, BASE), [override])


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, BASE + "train:\n  lr: [1, 2\n  x: 3\n")
    with pytest.raises(UserError, match=r"run\.yaml: line \d+, column \d+: invalid YAML"):
        config.load(path)


def test_missing_model_and_corpus_are_reported():
    with pytest.raises(UserError, match="model.name_or_path"):
        config.load(None, ["data.train=x"])
    with pytest.raises(UserError, match="data.train"):
        config.load(None, ["model.name_or_path=m"])


def test_round_trip_through_dump(tmp_path):
    cfg = config.load(write(tmp_path, BASE), ["train.lr=0.001", "lora.target_modules=[q, v]"])
    again = config.from_dict(__import__("yaml").safe_load(config.dump(cfg)))
    assert again == cfg


def test_help_comes_from_field_docstrings():
    text = keys_help()
    for key, _, _, doc in config.all_keys():
        assert key in text
        assert doc, f"{key} has no docstring"
    assert "Optimizer steps" in text


def test_every_shipped_preset_loads():
    from importlib import resources

    from ecoadapt.commands import sweep

    names = preset_names()
    assert "quickstart" in names
    for name in names:
        cfg = config.load(resolve_config(name))
        assert cfg.model.name_or_path and cfg.data.train
    sweeps = list((resources.files("ecoadapt") / "presets" / "sweeps").iterdir())
    assert any(s.name == "demo.yaml" for s in sweeps)
    for path in sweeps:
        spec = sweep.load(str(path))  # every point's config checked against the schema
        assert len(spec.points) >= 3 and any(p.baseline for p in spec.points)


def test_every_yaml_under_bench_fits_the_schema():
    """The benchmark configs and sweeps, and the examples' sweeps, are checked like the presets."""
    from ecoadapt.commands import sweep

    bench = Path(__file__).parent.parent / "bench"
    configs = sorted((bench / "configs").glob("*.yaml"))
    sweeps = sorted((bench / "sweeps").glob("*.yaml")) + sorted((bench.parent / "examples").glob("*.yaml"))
    assert configs and sweeps
    for path in configs:
        cfg = config.load(path)
        assert cfg.model.name_or_path and cfg.data.train
    for path in sweeps:
        spec = sweep.load(path)
        assert any(p.baseline for p in spec.points) and spec.report.objective in ("energy", "time", "memory")


def test_every_harness_task_shipped_names_its_task_and_local_data():
    """The harness task files beside the examples and benchmarks (their data is not shipped)."""
    import yaml as _yaml

    root = Path(__file__).parent.parent
    files = sorted((root / "examples" / "harness").glob("*.yaml")) + sorted((root / "bench" / "harness").glob("*.yaml"))
    assert files
    for path in files:
        task = _yaml.safe_load(path.read_text())
        assert isinstance(task["task"], str) and task["output_type"] == "multiple_choice", path
        assert task["dataset_kwargs"]["data_files"]["test"] and task["test_split"] == "test", path


def test_summary_reference_lists_every_field_with_help():
    from ecoadapt.results.summary import RunSummary, reference

    rows = reference()
    names = [r[0] for r in rows]
    for f in dataclasses.fields(RunSummary):
        assert f.name in names
    assert "eval.loss_before" in names and "model.trainable_blocks" in names  # nested sections too
    assert all(doc for _, _, _, doc in rows), [n for n, _, _, d in rows if not d]
    text = keys_help(rows, defaults=False)
    assert "memory  (map | null)" in text and "train_peak_bytes" in text


def test_task_files_are_looked_up_beside_the_config_first_then_from_the_working_folder(tmp_path, monkeypatch):
    from ecoadapt.config import paths

    beside = tmp_path / "project"
    beside.mkdir()
    (beside / "labels.jsonl").write_text('{"text": "a", "label": "x"}\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "labels.jsonl").write_text('{"text": "planted", "label": "y"}\n')
    (elsewhere / "test.jsonl").write_text('{"text": "b", "label": "x"}\n')
    monkeypatch.chdir(elsewhere)
    task = {"train": ["labels.jsonl"], "test": ["test.jsonl"], "harness": ["builtin:x"]}
    cfg = config.from_dict({"model": {"name_or_path": "m"}, "data": {"train": ["c.txt"]}, "task": task})
    paths.anchor_task_files(cfg, beside)
    assert cfg.task.train == [str(beside / "labels.jsonl")]  # the config's own, not the working folder's
    assert cfg.task.test == ["test.jsonl"]  # not beside the config: left to the working folder
    assert cfg.task.harness == ["builtin:x"]
