"""`ecoadapt adapt` end to end on tiny models, and its answers to bad input."""

import json
import subprocess
import sys

import pytest
import yaml

from ecoadapt.cli import main
from helpers.runs import heldout_loss_of, write_config


def test_adapt_mlm_end_to_end(tmp_path, tiny_bert, corpus_jsonl, capsys):
    path = write_config(tmp_path, tiny_bert, corpus_jsonl, train={"grad_accum": 2})
    assert main(["adapt", str(path)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["objective"] == "mlm"
    assert summary["steps"] == 6
    assert summary["tokens"] == 6 * 2 * 4 * 16
    assert summary["tokens_per_s"] > 0 and summary["time_s"] > 0
    assert summary["eval"]["loss"] < summary["eval"]["loss_before"]
    assert summary["memory"]["peak_bytes"] > 0 and summary["memory"]["device"] == "cpu"
    assert summary["memory"]["peak_above_baseline_bytes"] > 0
    assert 0 < summary["mfu"] <= 1
    assert summary["flops"]["peak_source"] in ("measured", "cache")
    assert summary["energy"]["method"] in ("measured", "estimated") and summary["energy"]["joules"] > 0
    e = summary["energy"]
    assert e["mj_per_token"] == pytest.approx(1000 * e["train_joules"] / summary["tokens"])
    # The tool's own cost has windows of its own: here the matmul peak, measured once (a fresh cache).
    o = e["overhead"]
    assert summary["flops"]["peak_source"] == "measured" and o["windows"]["peak_flops"] > 0
    assert o["joules"] == pytest.approx(sum(o["windows"].values()))
    assert o["share"] == pytest.approx(o["joules"] / e["joules"]) and 0 < o["share"] < 1
    assert summary["environment"]["torch"]
    assert summary["config"]["train"]["grad_accum"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["grad_accum"] == 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert {"step", "loss", "lr", "tokens", "elapsed_s", "energy_j"} <= lines[0].keys()
    assert lines[-1]["energy_j"] >= lines[0]["energy_j"] > 0
    from transformers import AutoModelForMaskedLM

    saved = AutoModelForMaskedLM.from_pretrained(run / "model")
    assert heldout_loss_of(saved, run, "mlm") == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and f"{e['mj_per_token']:.2f} mJ per training token" in printed
    parts = ", ".join(name.replace("_", " ") for name in o["windows"])
    assert f"overhead (ecoadapt's own: {parts}): {o['joules']:,.0f} J, {o['share']:.1%}" in printed
    # Measured once per device: the next run reads it, and spends next to nothing on it.
    (tmp_path / "again").mkdir()
    assert main(["adapt", str(write_config(tmp_path / "again", tiny_bert, corpus_jsonl))]) == 0
    second = json.loads((tmp_path / "again" / "run" / "summary.json").read_text())
    assert second["flops"]["peak_source"] == "cache" and "peak_flops" in second["energy"]["overhead"]["windows"]
    assert second["energy"]["overhead"]["windows"]["peak_flops"] < o["windows"]["peak_flops"]


def test_adapt_clm_lora_saves_a_loadable_adapter_and_merged_model(tmp_path, tiny_llama, corpus_jsonl):
    path = write_config(tmp_path, tiny_llama, corpus_jsonl, lora={"enabled": True, "r": 4, "merge": True})
    assert main(["adapt", str(path), "--set", "train.max_steps=8"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "clm" and summary["model"]["lora"] is True
    assert summary["steps"] == 8
    assert summary["eval"]["perplexity"] < summary["eval"]["perplexity_before"]
    assert summary["model"]["parameters"]["trainable"] < summary["model"]["parameters"]["total"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter")
    assert heldout_loss_of(adapted, run, "clm") == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(run / "model")
    assert heldout_loss_of(merged, run, "clm") == pytest.approx(summary["eval"]["loss"], rel=1e-4)
    untrained = heldout_loss_of(AutoModelForCausalLM.from_pretrained(tiny_llama), run, "clm")
    assert untrained == pytest.approx(summary["eval"]["loss_before"], rel=1e-5)  # the check can tell them apart
    assert not list(run.glob(".*.tmp"))
    for folder, library in (("adapter", "peft"), ("model", "transformers")):
        check_model_card(run / folder, summary, library)


def check_model_card(folder, summary, library):
    """The saved folder's README.md is a hub model card with the run's figures and CO2 block,
    and energy.spdx.json gives the adaptation energy in kWh."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == library and "ecoadapt" in card.data.tags
    co2 = card.data.co2_eq_emissions
    joules = summary["energy"]["train_joules"]
    assert co2["emissions"] == pytest.approx(joules / 3.6e6 * 480, rel=1e-5)  # the world average, said so
    assert "world average" in co2["source"] and "estimated" in co2["source"]
    assert co2["training_type"] == "fine-tuning" and "CPU cores" in co2["hardware_used"]
    assert f"{summary['eval']['loss']:.4f} after" in card.text and "adaptation energy" in card.text
    spdx = json.loads((folder / "energy.spdx.json").read_text())["@graph"][0]["ai_energyConsumption"]
    quantity = spdx["ai_finetuningEnergyConsumption"][0]
    assert float(quantity["ai_energyQuantity"]) == pytest.approx(joules / 3.6e6, rel=1e-4)
    assert quantity["ai_energyUnit"] == "kilowattHour"


def test_bad_corpus_exits_2_and_writes_nothing(tmp_path, tiny_bert, capsys):
    path = write_config(tmp_path, tiny_bert, tmp_path / "missing*.jsonl")
    assert main(["adapt", str(path)]) == 2
    err = capsys.readouterr().err
    assert "missing*.jsonl' matches no file" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_missing_field_exits_2_naming_file_and_line(tmp_path, tiny_bert, corpus_jsonl, capsys):
    corpus_jsonl.write_text(corpus_jsonl.read_text() + '{"text": "no caption here"}\n')
    path = write_config(tmp_path, tiny_bert, corpus_jsonl)
    assert main(["adapt", str(path)]) == 2
    assert "corpus.jsonl:401: no field 'caption'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_bert, corpus_jsonl, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    path = write_config(tmp_path, tiny_bert, corpus_jsonl)
    assert main(["adapt", str(path)]) == 2
    assert "holds files ecoadapt did not write (keep.txt)" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


def test_unknown_key_and_missing_model(tmp_path, tiny_bert, corpus_jsonl, capsys):
    path = write_config(tmp_path, tiny_bert, corpus_jsonl)
    assert main(["adapt", str(path), "--set", "train.micro_batch=2"]) == 2
    assert "did you mean 'train.micro_batch_size'" in capsys.readouterr().err
    assert main(["adapt", str(path), "--set", f"model.name_or_path={tmp_path}/nope"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(Exception, match="no such folder"):
        main(["--debug", "adapt", str(path), "--set", f"model.name_or_path={tmp_path}/nope"])


def test_console_entry_point_exit_status(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "ecoadapt", "adapt", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_the_citation_file_is_valid_and_names_this_version():
    from pathlib import Path

    import ecoadapt

    cff = yaml.safe_load((Path(__file__).parent.parent / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == ecoadapt.__version__
    assert cff["title"].startswith("ecoadapt") and cff["authors"]
