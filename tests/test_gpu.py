"""The CUDA paths on a real GPU: precision modes, per-window memory, NVML energy, data parallelism.

Marked ``gpu`` / ``multigpu``: skipped where no CUDA device is visible (CI), run by
``pytest -m gpu`` on a GPU machine (bench/gpu-check.sh does, too).
"""

import json

import pytest

from ecoadapt.cli import main
from helpers.runs import heldout_loss_of, write_config


def adapt_on_cuda(tmp_path, model, corpus, *overrides):
    # No forecast probe unless a test asks: each probe starts two CUDA processes; with them, two
    # of these tests took 110 s on the H200, past bench/gpu-check.sh's time.
    path = write_config(tmp_path, model, corpus, train={"device": "cuda", "max_steps": 4})
    sets = ["measure.forecast=false", *overrides]
    assert main(["adapt", str(path), *(f"--set={o}" for o in sets)]) == 0
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp32", "tf32", "fp16", "bf16", "bf16-pure"])
def test_every_precision_mode_trains_on_cuda_with_per_window_memory(tmp_path, tiny_llama, corpus_jsonl, mode):
    summary = adapt_on_cuda(tmp_path, tiny_llama, corpus_jsonl, f"precision.mode={mode}")
    mem = summary["memory"]
    assert mem["device"] == "cuda" and mem["compare_with"] == "peak_bytes"
    assert mem["train_peak_bytes"] > 0 and mem["eval_peak_bytes"] > 0
    assert mem["train_peak_reserved_bytes"] >= mem["train_peak_bytes"]
    assert mem["peak_bytes"] == mem["train_peak_bytes"]
    assert summary["environment"]["gpu"]
    if mode == "fp32":
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
        assert heldout_loss_of(saved, tmp_path / "run", "clm") == pytest.approx(summary["eval"]["loss"], rel=1e-3)


@pytest.mark.gpu
def test_nvml_energy_is_measured_where_zeus_can_read_it(tmp_path, tiny_llama, corpus_jsonl):
    pytest.importorskip("zeus")
    summary = adapt_on_cuda(tmp_path, tiny_llama, corpus_jsonl, "measure.energy=auto")
    energy = summary["energy"]
    assert energy["method"] in ("measured", "estimated")
    if energy["method"] == "measured":
        assert energy["meter"].startswith("zeus") and energy["phases"]["train"]["joules"] > 0


@pytest.mark.gpu
def test_the_forecast_on_cuda_is_the_allocators_peak(tmp_path, tiny_llama, corpus_jsonl):
    """The probe measures the CUDA allocator's peak as the run does: the H200 read 0.93-1.00
    of the measured training peak on a 6-block Llama."""
    summary = adapt_on_cuda(tmp_path, tiny_llama, corpus_jsonl, "measure.forecast=true", "precision.mode=bf16")
    versus = summary["forecast"]["versus_measured"]
    assert versus["peak_bytes"]["measured"] == summary["memory"]["train_peak_bytes"]
    assert 0.8 < versus["peak_bytes"]["ratio"] < 1.25
    assert versus["step_s"]["ratio"] is not None and versus["train_joules"]["forecast"] > 0


@pytest.mark.multigpu
def test_ddp_over_two_gpus_reports_the_jobs_figures(tmp_path, tiny_llama, corpus_jsonl):
    path = write_config(tmp_path, tiny_llama, corpus_jsonl, train={"device": "cuda", "max_steps": 4})
    assert main(["adapt", str(path), "--set", "parallel.nproc=2"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["parallel"] == {"world_size": 2, "strategy": "ddp"}
    assert len(summary["memory"]["per_rank_peak_bytes"]) == 2
