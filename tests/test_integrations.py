"""EcoadaptCallback in a real (tiny) transformers.Trainer run: the fields, a budget that stops
it, evaluation kept apart, and `ecoadapt report` reading it beside an ecoadapt run."""

import json

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from ecoadapt.integrations import EcoadaptCallback
from ecoadapt.reports import builder
from ecoadapt.results.summary import RunSummary
from helpers.runs import run_command
from helpers.tiny_models import sentences

SEQ = 16


def trainer_run(tmp_path, tiny_bert, callback, steps=6, eval_steps=3):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [dict(tokenizer(s, truncation=True, max_length=SEQ, padding="max_length")) for s in sentences(80)]
    args = TrainingArguments(
        str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=2, eval_strategy="steps", eval_steps=eval_steps, eval_on_start=True, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(
        model=AutoModelForMaskedLM.from_pretrained(tiny_bert),
        args=args,
        train_dataset=rows[:64],
        eval_dataset=rows[64:],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        callbacks=[callback],
    )
    trainer.train()
    return rows


def test_a_trainer_run_gets_ecoadapt_figures_and_its_evaluation_apart(tmp_path, tiny_bert):
    out = tmp_path / "measured"
    rows = trainer_run(tmp_path, tiny_bert, EcoadaptCallback(out, measure={"energy": "estimate"}, name="hf-trainer"))
    summary = RunSummary.from_dict(json.loads((out / "summary.json").read_text()))
    assert summary.status == "completed" and summary.steps == 6
    real = sum(sum(r["attention_mask"]) for r in rows[:64]) / 64  # tokens per example, not padding
    assert summary.tokens == pytest.approx(6 * 4 * real, rel=0.35)  # 24 examples drawn, their real tokens
    assert summary.tokens_per_s == pytest.approx(summary.tokens / summary.time_s)
    energy = summary.energy
    assert energy["method"] == "estimated" and energy["train_joules"] > 0
    assert "eval" in energy["phases"] and energy["phases"]["eval"]["joules"] > 0  # evaluation apart
    assert energy["joules"] == pytest.approx(energy["phases"]["train"]["joules"] + energy["phases"]["eval"]["joules"])
    assert summary.memory["train_peak_bytes"] > 0 and "eval_peak_bytes" in summary.memory
    assert summary.eval is not None and summary.eval.loss < summary.eval.loss_before  # step 0 vs step 6
    assert summary.flops["model_flops_per_token"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6] and all(r["energy_method"] == "estimated" for r in logged)
    assert logged[-1]["energy_j"] >= logged[0]["energy_j"] > 0


def test_a_budget_stops_the_trainer(tmp_path, tiny_bert):
    out = tmp_path / "budgeted"
    trainer_run(
        tmp_path, tiny_bert, EcoadaptCallback(out, measure={"energy": "estimate"}, budget={"tokens": 100}), steps=50
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped_by_budget" and summary["stopped_by"] == "tokens"
    assert summary["steps"] < 10 and summary["tokens"] >= 100  # stopped at the first step past 100 tokens
    assert summary["budget"]["limits"]["tokens"] == 100


def test_a_bad_callback_setting_is_named(tmp_path):
    from ecoadapt.core.errors import UserError

    with pytest.raises(UserError, match="energy_jj"):
        EcoadaptCallback(tmp_path, budget={"energy_jj": 1})
    from types import SimpleNamespace

    # Under torchrun each rank would measure only itself: refused, saying what to use instead.
    with pytest.raises(UserError, match="runs 2 processes.*parallel.nproc"):
        EcoadaptCallback(tmp_path).on_train_begin(SimpleNamespace(world_size=2), None, None)


def test_report_puts_a_trainer_run_beside_an_ecoadapt_run(tmp_path, tiny_bert, corpus_jsonl):
    from ecoadapt.cli import main

    trainer_run(
        tmp_path, tiny_bert, EcoadaptCallback(tmp_path / "hf", measure={"energy": "estimate"}, name="hf-trainer")
    )
    sets = {
        "model.name_or_path": tiny_bert, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "train.max_steps": 3, "train.micro_batch_size": 4, "measure.energy": "estimate",
        "output.dir": tmp_path / "ours", "output.save_model": False,
    }  # fmt: skip
    assert run_command("adapt", tmp_path, sets) == 0
    assert main(["report", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    rows = {r["name"]: r for r in builder.load_rows(tmp_path / "ours", [tmp_path / "hf"])[0]}
    assert set(rows) == {"ours", "hf-trainer"} and rows["ours"]["baseline"] and not rows["hf-trainer"]["baseline"]
    assert rows["hf-trainer"]["energy_method"] == "estimated" and rows["hf-trainer"]["train_joules"] > 0
    assert "hf-trainer" in (tmp_path / "ours" / "report.md").read_text()


@pytest.mark.slow
def test_a_resumed_trainer_run_keeps_its_earlier_records_and_counts_them(tmp_path, tiny_bert):
    """The callback used to truncate metrics.jsonl at every train start: a resumed run lost its
    records, and its budgets started again from zero."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [dict(tokenizer(s, truncation=True, max_length=SEQ, padding="max_length")) for s in sentences(80)]
    out = tmp_path / "measured"

    def trainer(callback):
        args = TrainingArguments(
            str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
            logging_steps=1, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        torch.manual_seed(0)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
        return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[callback])

    trainer(EcoadaptCallback(out, measure={"energy": "estimate"})).train()
    whole = RunSummary.from_dict(json.loads((out / "summary.json").read_text()))
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # As if it had been killed after step 3's checkpoint: resume from it.
    trainer(EcoadaptCallback(out, measure={"energy": "estimate"})).train(
        resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-3")
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Each step as the uninterrupted run logged it (the Trainer's closing log is at step 6 too):
    # 1-3 kept, 4-6 logged again, nothing twice.
    assert [r["step"] for r in records] == [r["step"] for r in first] and records[2]["step"] == 3
    assert records[:3] == first[:3]
    assert records[3]["energy_j"] > records[2]["energy_j"] and records[3]["tokens"] > records[2]["tokens"]
    resumed = RunSummary.from_dict(json.loads((out / "summary.json").read_text()))
    assert resumed.tokens == whole.tokens  # the same batches: the earlier part counted, not lost
    assert resumed.energy is not None and resumed.energy["train_joules"] > records[2]["energy_j"]
