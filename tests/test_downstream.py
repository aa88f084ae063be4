"""The downstream task: metrics, splits, bad input, learning, and base vs adapted."""

import json
import random

import pytest
import torch

from ecoadapt.commands import evaluate
from ecoadapt.config import ModelConfig, RunConfig, TaskConfig
from ecoadapt.core.errors import UserError
from ecoadapt.data import labelled
from ecoadapt.task import downstream, finetune
from ecoadapt.task.metrics import classification
from helpers.runs import adapt_summary, set_args
from helpers.tiny_models import write_task


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
    scores = finetune.fine_tune(run, data, seed=0, backbone=None, device=torch.device("cpu"))
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
    args = set_args(sets)
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
        evaluate.judge(run)


def test_bad_task_records_are_named_or_skipped_and_counted(tmp_path):
    path = write_task(tmp_path / "t.jsonl", 60, extra=['{"text": "\\t", "label": "red"}', '{"text": "x"}'])
    with pytest.raises(UserError, match=r"t\.jsonl:61: empty 'text'.*task\.bad_records: skip"):
        downstream.read_examples(TaskConfig(train=[str(path)]))
    train, test, labels, bad = downstream.read_examples(TaskConfig(train=[str(path)], bad_records="skip"))
    assert len(train) + len(test) == 60 and labels == ["blue", "red"]
    assert bad["skipped"] == 2 and "t.jsonl:62: no label 'label'" in bad["examples"][1]
    with pytest.raises(UserError, match="every record was skipped.*no label 'nolabel'"):
        downstream.read_examples(TaskConfig(train=[str(path)], label_field="nolabel", bad_records="skip"))


def adapt_args(tmp_path, tiny_bert, corpus_jsonl, task, **more):
    """`ecoadapt adapt` arguments for a 4-step tiny-BERT run with a task."""
    (tmp_path / "empty.yaml").write_text("{}\n")
    sets = {
        "model.name_or_path": tiny_bert, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "data.eval_fraction": 0.1, "train.max_steps": 4, "train.micro_batch_size": 4,
        "task.train": task, "task.seeds": "[0, 1]", "task.epochs": 1, "task.metric": "macro_f1",
        "measure.energy": "estimate", "output.dir": tmp_path / "run", **more,
    }  # fmt: skip
    return [str(tmp_path / "empty.yaml"), *set_args(sets)]


def test_the_task_is_checked_before_the_adaptation_starts(tmp_path, tiny_bert, corpus_jsonl, capsys):
    from ecoadapt.cli import main

    task = write_task(tmp_path / "task.jsonl", 40)
    args = adapt_args(tmp_path, tiny_bert, corpus_jsonl, task, **{"task.label_field": "nolabel"})
    assert main(["adapt", *args]) == 2
    assert "task.jsonl:1: no label 'nolabel' (fields: label, text); set task.label_field" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was trained, nothing written


def test_a_task_that_fails_after_adaptation_keeps_every_measured_section(
    tmp_path, tiny_bert, corpus_jsonl, monkeypatch
):
    from ecoadapt.cli import main

    task = write_task(tmp_path / "task.jsonl", 120)
    args = adapt_args(tmp_path, tiny_bert, corpus_jsonl, task)

    def out_of_memory(*args, **kwargs):  # the task's first fine-tune fails, as on a small GPU
        raise RuntimeError("CUDA out of memory (injected)")

    with monkeypatch.context() as patched:  # undone on leaving; the isolated cache stays
        patched.setattr(finetune, "fine_tune", out_of_memory)
        assert main(["adapt", *args]) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["eval"]["loss"] > 0 and summary["steps"] == 4
    assert summary["energy"]["train_joules"] > 0 and summary["memory"]["train_peak_bytes"] > 0
    assert summary["task"]["status"] == "failed" and "CUDA out of memory" in summary["task"]["error"]
    assert summary["task"]["energy"]["method"] == "estimated"  # the failed task's cost is reported too
    assert main(["evaluate", *args]) == 0  # the task alone, on the saved model
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["task"]["verdict"] is not None and again["eval"] == summary["eval"]


def test_a_probe_is_paired_and_scores_the_same_model_the_same(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    run = RunConfig(
        model=ModelConfig(str(tiny_bert)),
        task=TaskConfig(train=[str(write_task(tmp_path / "t.jsonl", 400))], mode="probe", seeds=[0, 1, 2]),
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    same = downstream.backbone_state(finetune.build_classifier(run, 2, 0, 0, None))
    out = downstream.compare(run, tokenizer, same, torch.device("cpu"))
    assert out.mode == "probe" and out.base is not None and out.base > 0.9  # the colour word is linearly readable
    # The same weights and the same bootstrap resample per seed: a gain of exactly 0 everywhere.
    assert out.gain_by_seed() == {0: 0.0, 1: 0.0, 2: 0.0}
    assert out.verdict == "no detectable effect"
    scores = [r.base["accuracy"] for r in out.per_seed if r.base is not None]
    assert len(set(scores)) > 1  # the seeds resample the training examples: they differ
    assert out.base_cached == 0 and downstream.compare(run, tokenizer, same, torch.device("cpu")).base_cached == 3
    run.task.cache = False  # computed afresh, and not counted as cached
    assert downstream.compare(run, tokenizer, same, torch.device("cpu")).base_cached == 0


def test_a_new_head_trains_alone_first_and_the_body_at_a_lower_rate(tmp_path, tiny_bert, corpus_jsonl):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    headless = tmp_path / "headless"  # the encoder alone, as MiniLM ships: the MLM head will be new
    AutoModel.from_pretrained(tiny_bert).save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(headless)
    sets = {
        "model.name_or_path": headless, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "train.max_steps": 2, "train.micro_batch_size": 4, "train.lr": 5e-3,
        "train.head_first_steps": 6, "train.body_lr_scale": 1e-4, "output.dir": tmp_path / "run",
    }  # fmt: skip
    summary = adapt_summary(tmp_path, sets)
    assert summary["head_first"]["steps"] == 6 and summary["head_first"]["tokens"] == 6 * 4 * 16
    assert summary["steps"] == 2 and "trained alone first for 6 steps" in summary["notes"][0]
    before = AutoModel.from_pretrained(headless).state_dict()
    after = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "model")
    body = after.bert.state_dict()
    # The body moved by at most 2 steps at 5e-7 (Adam steps are about lr in size): not at all
    # during the head's 6 steps; the head learnt from zero.
    drift = max((body[k] - before[k]).abs().max().item() for k in before if k in body)
    assert drift < 2e-6
    from ecoadapt.model import pretrained

    initial = pretrained.load(ModelConfig(str(headless)), 16, seed=0).model  # the same new head, as first drawn
    key = "cls.predictions.transform.dense.weight"
    assert (after.state_dict()[key] - initial.state_dict()[key]).abs().max().item() > 1e-2  # the head learnt


def test_test_examples_can_be_bounded_keeping_each_labels_share(tmp_path):
    path = write_task(tmp_path / "t.jsonl", 400)
    full = downstream.read_examples(TaskConfig(train=[str(path)], test_fraction=0.5))[1]
    bounded = downstream.read_examples(TaskConfig(train=[str(path)], test_fraction=0.5, max_test_examples=50))[1]
    assert len(bounded) == 50 and {e.text for e in bounded} <= {e.text for e in full}
    share = sum(e.label == "red" for e in full) / len(full)
    assert abs(sum(e.label == "red" for e in bounded) / 50 - share) < 0.05


def test_the_base_results_key_follows_contents_and_settings_not_paths(tmp_path, tiny_bert):
    from ecoadapt.task import base_cache

    (tmp_path / "a").mkdir()
    first = write_task(tmp_path / "a" / "task.jsonl", 40)
    moved = tmp_path / "b" / "renamed.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())

    def key(path, **task):
        run = RunConfig(model=ModelConfig(str(tiny_bert)), task=TaskConfig(train=[str(path)], **task))
        return base_cache.key(run, "fp32", "cpu")

    assert key(first) == key(moved)  # the same examples elsewhere: the same base results
    assert key(first) != key(first, epochs=4.0) and key(first) != key(first, mode="probe")
    assert key(first, seeds=[0]) == key(first, seeds=[0, 1, 2])  # each seed is its own entry
    moved.write_text(moved.read_text() + '{"text": "one more", "label": "red"}\n')
    assert key(first) != key(moved)  # other contents: computed again


def test_the_base_results_key_holds_the_code_and_every_scoring_library(tmp_path, tiny_bert, monkeypatch):
    from ecoadapt.task import base_cache

    task = write_task(tmp_path / "task.jsonl", 40)
    run = RunConfig(model=ModelConfig(str(tiny_bert)), task=TaskConfig(train=[str(task)]))
    before = base_cache.key(run, "fp32", "cpu")
    monkeypatch.setattr(base_cache, "source_revision", lambda: "0123abc+dirty.456def")  # an edited source tree
    edited = base_cache.key(run, "fp32", "cpu")
    assert edited != before
    real = base_cache.package_version
    monkeypatch.setattr(base_cache, "package_version", lambda p: "9.9" if p == "peft" else real(p))
    assert base_cache.key(run, "fp32", "cpu") != edited  # another peft: computed again
    assert {"peft", "tokenizers"} <= set(base_cache.SCORING_PACKAGES)


def test_task_precision_auto_is_fp32_on_a_cpu_and_bf16_or_fp16_on_a_gpu(monkeypatch):
    assert downstream.task_precision("auto", torch.device("cpu")) == "fp32"
    assert downstream.task_precision("fp16", torch.device("cpu")) == "fp16"  # as set
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert downstream.task_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a V100
    assert downstream.task_precision("auto", torch.device("cuda")) == "fp16"


def test_probe_features_come_back_in_the_examples_order_whatever_the_batching(tiny_bert):
    """Batches are made of examples of similar length; each example's features are those it gets
    alone, in its own place."""
    import torch
    from transformers import AutoModel

    from ecoadapt.data import labelled
    from ecoadapt.model.precision import Policy
    from ecoadapt.task import linear_probe

    model = AutoModel.from_pretrained(tiny_bert)
    lengths = [9, 3, 14, 5, 3, 11, 7, 2] * 20  # 160 examples: three batches, unsorted lengths
    ids = [[1, *[(i * 7 + j) % 25 + 5 for j in range(n)], 2] for i, n in enumerate(lengths)]
    data = labelled.Encoded(ids, torch.zeros(len(ids), dtype=torch.long))
    got = linear_probe.features(model, data, 0, Policy("fp32", "cpu"), torch.device("cpu"))
    assert got.shape == (len(ids), model.config.hidden_size)
    for i in (0, 1, 2, 79, 159):
        alone = labelled.Encoded([ids[i]], torch.zeros(1, dtype=torch.long))
        expected = linear_probe.features(model, alone, 0, Policy("fp32", "cpu"), torch.device("cpu"))[0]
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-5)
