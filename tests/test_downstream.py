"""The downstream task: metrics, splits, bad input, learning, and base vs adapted."""

import json
import random

import pytest
import torch

from conftest import sentences
from ecoadapt import downstream, evaluate
from ecoadapt.config import ModelConfig, RunConfig, TaskConfig
from ecoadapt.data import labelled
from ecoadapt.errors import UserError
from ecoadapt.metrics import classification


def test_metrics_agree_with_an_independent_computation():
    rng = random.Random(0)
    labels = [rng.randrange(4) for _ in range(300)]
    preds = [t if rng.random() < 0.6 else rng.randrange(4) for t in labels]
    got = classification(torch.tensor(preds), torch.tensor(labels), 5)  # class 4 never occurs
    accuracy = sum(p == t for p, t in zip(preds, labels, strict=True)) / len(labels)
    f1s = []
    for c in sorted(set(labels) | set(preds)):
        tp = sum(p == c and t == c for p, t in zip(preds, labels, strict=True))
        precision = tp / max(1, sum(p == c for p in preds))
        recall = tp / max(1, sum(t == c for t in labels))
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    assert got["accuracy"] == pytest.approx(accuracy)
    assert got["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert got["micro_f1"] == pytest.approx(accuracy)  # single-label: micro-F1 is accuracy


def write_task(path, n=240, seed=0, extra=()):
    """A separable task: the label is the colour word the text ends with."""
    rng = random.Random(seed)
    lines = []
    for text in sentences(n, seed):
        label = rng.choice(["red", "blue"])
        lines.append(json.dumps({"text": f"{text} {label}", "label": label}))
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def test_stratified_split_is_deterministic_and_keeps_every_label(tmp_path):
    examples = labelled.read([str(write_task(tmp_path / "t.jsonl"))], TaskConfig())
    train, test = labelled.stratified_split(examples, 0.25)
    again = labelled.stratified_split(examples, 0.25)
    assert [e.text for e in test] == [e.text for e in again[1]]
    assert {e.label for e in test} == {e.label for e in train} == {"red", "blue"}
    assert 50 <= len(test) <= 70
    report = labelled.class_report(train, test)
    assert sum(report["test_counts"].values()) == len(test) and report["imbalance_ratio"] >= 1


def test_bad_task_input_names_file_and_record(tmp_path):
    cfg = TaskConfig()
    bad = write_task(tmp_path / "a.jsonl", 10, extra=['{"text": "   ", "label": "red"}'])
    with pytest.raises(UserError, match=r"a\.jsonl:11: empty 'text'"):
        labelled.read([str(bad)], cfg)
    bad = write_task(tmp_path / "b.jsonl", 10, extra=['{"text": "a red lamp"}'])
    with pytest.raises(UserError, match=r"b\.jsonl:11: no label 'label'"):
        labelled.read([str(bad)], cfg)
    train = labelled.read([str(write_task(tmp_path / "c.jsonl", 10))], cfg)
    test = labelled.read([str(write_task(tmp_path / "d.jsonl", 3, extra=['{"text": "x", "label": "green"}']))], cfg)
    with pytest.raises(UserError, match=r"d\.jsonl:4: label 'green' never occurs in the training examples"):
        labelled.check_labels(train, test)


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_llama"])
def test_a_tiny_model_learns_a_separable_task(tmp_path, request, model_fixture):
    folder = request.getfixturevalue(model_fixture)
    run = RunConfig(
        model=ModelConfig(str(folder)),
        task=TaskConfig(train=[str(write_task(tmp_path / "t.jsonl", 400))], epochs=6, lr=3e-3, micro_batch_size=16),
    )
    from transformers import AutoTokenizer

    data = downstream.prepare(run.task, AutoTokenizer.from_pretrained(folder))
    scores = downstream.fine_tune(run, data, seed=0, backbone=None, device=torch.device("cpu"))
    assert scores["accuracy"] > 0.9, scores


def test_adapt_with_a_task_reports_base_and_adapted_and_evaluate_agrees(tmp_path, tiny_bert, corpus_jsonl):
    from ecoadapt.cli import main

    task = write_task(tmp_path / "task.jsonl", 200)
    (tmp_path / "empty.yaml").write_text("{}\n")
    sets = {
        "model.name_or_path": tiny_bert, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "data.eval_fraction": 0.1, "train.max_steps": 4, "train.micro_batch_size": 4,
        "task.train": task, "task.seeds": "[0, 1]", "task.epochs": 1, "task.metric": "macro_f1",
        "measure.energy": "estimate", "output.dir": tmp_path / "run",
    }  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(["adapt", str(tmp_path / "empty.yaml"), *args]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    t = summary["task"]
    assert t["metric"] == "macro_f1" and len(t["per_seed"]) == 2
    assert 0 <= t["base"] <= 1 and 0 <= t["adapted"] <= 1
    assert t["delta"] == pytest.approx(t["adapted"] - t["base"])
    assert {"accuracy", "macro_f1", "micro_f1"} <= t["per_seed"][0]["base"].keys()
    assert t["energy"]["method"] == "estimated" and "task" in summary["energy"]["phases"]
    assert summary["energy"]["train_joules"] < summary["energy"]["joules"]  # the task is reported apart

    # `ecoadapt evaluate` on the same run directory reproduces the numbers (same seeds, same data).
    assert main(["evaluate", str(tmp_path / "empty.yaml"), *args]) == 0
    again = json.loads((tmp_path / "run" / "task.json").read_text())
    assert again["base"] == pytest.approx(t["base"]) and again["adapted"] == pytest.approx(t["adapted"])


def test_evaluate_without_an_adapted_model_says_what_to_do(tmp_path, tiny_bert):
    task = write_task(tmp_path / "task.jsonl", 20)
    run = RunConfig(model=ModelConfig(str(tiny_bert)), task=TaskConfig(train=[str(task)]))
    run.output.dir = str(tmp_path / "nothing")
    with pytest.raises(UserError, match="run `ecoadapt adapt` with this config first"):
        evaluate.run(run)
