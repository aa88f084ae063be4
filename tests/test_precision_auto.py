"""precision.mode: auto (issue 24): the cheapest precision the device runs well, from the matmul
probe, said with its reason; a forced slow precision says what it costs."""

import pytest
import torch

from ecoadapt.measure import flops
from ecoadapt.model import precision_choice
from helpers.runs import adapt_summary


def fake_peaks(monkeypatch, fp32, bf16):
    peaks = {torch.float32: fp32, torch.bfloat16: bf16}
    monkeypatch.setattr(flops, "peak_flops", lambda device, dtype, given=None, at_least=None: (peaks[dtype], "cache"))


@pytest.mark.parametrize(("bf16", "mode"), [(16e9, "fp32"), (130e9, "fp32"), (300e9, "bf16")])
def test_a_cpu_gets_bf16_only_where_its_matmuls_are_clearly_faster(monkeypatch, bf16, mode):
    fake_peaks(monkeypatch, 118e9, bf16)  # 130 vs 118 is 1.1x: not enough to pay for the rest of the step
    choice = precision_choice.choose(torch.device("cpu"))
    assert choice["mode"] == mode
    assert f"bf16 matmuls at {bf16 / 1e9:,.0f} GFLOP/s on this CPU vs 118 in fp32 (measured)" in choice["why"]


@pytest.mark.parametrize(("native", "mode"), [(True, "bf16"), (False, "fp16")])
def test_a_gpu_gets_bf16_where_it_is_native_else_fp16(monkeypatch, native, mode):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA T4" if not native else "NVIDIA A10")
    choice = precision_choice.choose(torch.device("cuda"))
    assert choice["mode"] == mode and choice["probe_s"] == 0.0
    assert ("no native bfloat16" in choice["why"]) is (not native)


@pytest.mark.parametrize(("bf16", "mode"), [(300e9, "bf16"), (16e9, "fp32")])
def test_an_auto_run_stores_its_mode_and_why(monkeypatch, capsys, tmp_path, tiny_llama, corpus_jsonl, bf16, mode):
    fake_peaks(monkeypatch, 118e9, bf16)
    sets = {
        "model.name_or_path": tiny_llama, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "train.max_steps": 2, "train.micro_batch_size": 4, "precision.mode": "auto",
        "measure.forecast": False, "output.dir": tmp_path / "run",
    }  # fmt: skip
    summary = adapt_summary(tmp_path, sets)
    assert f"precision auto: {mode} (bf16 matmuls at" in capsys.readouterr().out
    assert summary["config"]["precision"]["mode"] == mode == summary["precision"]["mode"]
    assert summary["precision"]["auto"]["mode"] == mode and "GFLOP/s" in summary["precision"]["auto"]["why"]
    # The same command again finds its finished run: "auto" reads back to the same resolved config.
    assert adapt_summary(tmp_path, sets)["precision"]["auto"] == summary["precision"]["auto"]


def test_a_forced_16_bit_mode_that_is_slower_here_says_what_it_costs(monkeypatch, tmp_path, tiny_llama, corpus_jsonl):
    fake_peaks(monkeypatch, 118e9, 16e9)
    sets = {
        "model.name_or_path": tiny_llama, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "train.max_steps": 2, "train.micro_batch_size": 4, "precision.mode": "bf16",
        "measure.forecast": False, "output.dir": tmp_path / "run",
    }  # fmt: skip
    notes = adapt_summary(tmp_path, sets)["precision"]["notes"]
    assert any("about 7.4x fp32's matmul time and joules; precision.mode: auto picks fp32" in n for n in notes)
