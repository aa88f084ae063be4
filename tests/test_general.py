"""data.general_eval: the general text's loss before and after training (forgetting), paired by
batch, in the held-out evaluation's windows, refused when it shares a training document, shown
in the summary, the CLI and the report, and bounded in the recommendation."""

import json

import pytest

from ecoadapt.cli import main
from ecoadapt.reports import builder
from ecoadapt.task import stats
from ecoadapt.train.heldout import HeldOut
from helpers.runs import write_config
from helpers.tiny_models import sentences


def test_every_run_reports_its_general_text_loss_before_and_after_with_a_paired_interval(
    tmp_path, tiny_llama, corpus_jsonl, capsys
):
    config = write_config(tmp_path, tiny_llama, corpus_jsonl)
    assert main(["adapt", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    g = summary["eval"]["general"]
    assert g["sources"] == ["builtin:general-english"]  # the default
    assert g["blocks"] == 64  # data.eval_max_blocks of the 4-5 thousand tokens, 16 a block
    assert g["change"] == pytest.approx(g["loss"] - g["loss_before"])
    assert g["batches"] == 16 and g["ci_low"] < g["change"] < g["ci_high"]
    expected = stats.loss_change_verdict(stats.Interval(g["change"], g["ci_low"], g["ci_high"], 16, "batch"))
    assert (g["verdict"], g["verdict_text"]) == (expected.word, expected.text)
    # In the held-out evaluation's windows, not training's.
    assert summary["energy"]["phases"]["eval"]["seconds"] > 0
    assert f"general-text loss {g['loss_before']:.4f} -> {g['loss']:.4f}" in capsys.readouterr().out
    # The report shows the domain gain beside the general change, and says which forgot least.
    assert main(["report", str(tmp_path / "run")]) == 0
    row = next(r for r in builder.load_rows(tmp_path / "run")[0])
    assert row["general_change"] == pytest.approx(g["change"])
    assert row["domain_gain"] == pytest.approx(summary["eval"]["loss_before"] - summary["eval"]["loss"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "general loss change" in report and "General text (forgetting" in report


def test_general_text_of_ones_own_with_its_own_field_and_none_at_all(tmp_path, tiny_llama, corpus_jsonl):
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"body": s}) + "\n" for s in sentences(60, seed=7)))
    config = write_config(
        tmp_path, tiny_llama, corpus_jsonl, data={"general_eval": [str(general)], "general_text_field": "body"}
    )
    assert main(["adapt", str(config)]) == 0
    g = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]["general"]
    assert g["sources"] == [str(general)] and 1 <= g["blocks"] <= 64
    assert main(["adapt", str(config), "--set", "data.general_eval=[]", "--set", "output.overwrite=true"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]["general"] is None


def test_general_text_that_shares_a_training_document_is_refused_before_training(
    tmp_path, tiny_llama, corpus_jsonl, capsys
):
    shared = json.loads(corpus_jsonl.read_text().splitlines()[5])["caption"]
    general = tmp_path / "general.txt"
    general.write_text("an unrelated line of general text\n" + shared + "\n")
    config = write_config(tmp_path, tiny_llama, corpus_jsonl, data={"general_eval": [str(general)]})
    assert main(["adapt", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.general_eval: the document" in err and "is also in the training corpus" in err
    assert not (tmp_path / "run").exists()
    same_file = write_config(tmp_path, tiny_llama, corpus_jsonl, data={"general_eval": [str(corpus_jsonl)]})
    assert main(["adapt", str(same_file)]) == 2
    assert "is also in data.train" in capsys.readouterr().err


def test_a_missing_general_file_names_its_key(tmp_path, tiny_llama, corpus_jsonl, capsys):
    config = write_config(tmp_path, tiny_llama, corpus_jsonl, data={"general_eval": [str(tmp_path / "no.txt")]})
    assert main(["adapt", str(config)]) == 2
    assert "data.general_eval: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("low", "high", "word"),
    [
        (0.01, 0.05, "forgot"),
        (-0.05, -0.01, "improved"),
        (-0.01, 0.02, "no detectable change"),
        (None, None, "cannot tell"),
    ],
)
def test_the_forgetting_verdict_follows_the_interval(low, high, word):
    change = stats.Interval(0.0 if low is None else (low + high) / 2, low, high, 16 if low is not None else 1, "batch")
    verdict = stats.loss_change_verdict(change)
    assert verdict.word == word
    if low is not None:
        assert "16 batches" in verdict.text


def test_a_checkpoint_written_before_the_general_text_still_resumes():
    old = {"loss": 3.0, "perplexity": 20.1, "accuracy": 0.1, "target_tokens": 10, "time_s": 0.1, "batch_size": 4}
    held = HeldOut.from_dict(old)
    assert held.general is None and held.batch_losses == ()
    now = HeldOut(**old, batch_losses=(2.0, 4.0)).with_general(HeldOut(**old, batch_losses=(1.0,)))
    assert HeldOut.from_dict(json.loads(json.dumps(now.as_dict()))) == now


def test_the_recommendation_skips_recipes_that_forgot_more_than_the_bound():
    rows = [
        {"name": "full", "baseline": True, "eval_loss": 3.0, "train_joules": 100.0, "general_change": 0.30},
        {"name": "cheap", "baseline": False, "eval_loss": 3.01, "train_joules": 50.0, "general_change": 0.20},
        {"name": "lora", "baseline": False, "eval_loss": 3.02, "train_joules": 70.0, "general_change": 0.01},
    ]
    metric = builder.Metric("eval_loss", False)
    assert builder.recommend(rows, metric, 0.05)["name"] == "cheap"
    assert builder.recommend(rows, metric, 0.05, max_forgetting=0.1)["name"] == "lora"
    assert builder.recommend(rows, metric, 0.05, max_forgetting=-1.0) is None
