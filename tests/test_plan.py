"""`ecoadapt plan`: the forecast's arithmetic, the probe, and forecast against measured runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecoadapt.cli import main
from ecoadapt.config import RunConfig, from_dict
from ecoadapt.core.errors import UserError
from ecoadapt.forecast import costs, planner

PROBE = {
    "sizes": [
        {"micro_batch": 2, "micro_s": 0.30, "optimizer_s": 0.10, "step_s": 0.40, "first_step_s": 2.40,
         "peak_bytes": 600, "watts": 20.0},
        {"micro_batch": 4, "micro_s": 0.50, "optimizer_s": 0.12, "step_s": 0.62, "first_step_s": 0.70,
         "peak_bytes": 800, "watts": 30.0},
    ],
    "static_bytes": {"weights": 200, "gradients": 100, "optimizer": 200},
    "compile_s": 1.5,
}  # fmt: skip


def test_probe_sizes_are_the_runs_and_half_or_smaller_ones_extrapolated_at_most_twofold():
    assert costs.trial_sizes(1) == [1]
    assert costs.trial_sizes(2) == [1, 2]
    assert costs.trial_sizes(3) == [1, 3]
    assert costs.trial_sizes(8) == [4, 8]
    assert costs.trial_sizes(16) == [8, 16]
    assert costs.trial_sizes(16, fits=False) == [4, 8]  # the run's own did not fit
    assert costs.trial_sizes(2, fits=False) == [1]


def test_per_step_extrapolates_the_two_probes_linearly():
    step = costs.per_step(PROBE, micro_batch=8, grad_accum=3, tokens_per_step=8 * 3 * 64)
    # memory: 600 + (800 - 600) / 2 per row x (8 - 2) = 1200; activations 100 per row x 8
    assert step["peak_bytes"] == 1200
    assert step["parts_bytes"] == {
        "weights": 200,
        "gradients": 100,
        "optimizer": 200,
        "activations": 800,
        "other": -100,
    }
    # forward/backward: 0.30 + 0.10 x 6 = 0.90 per micro-batch, x3, plus the median optimizer step 0.11
    assert step["step_s"] == pytest.approx(3 * 0.90 + 0.11)
    assert step["tokens_per_s"] == pytest.approx(8 * 3 * 64 / 2.81)
    assert step["joules_per_step"] == pytest.approx(30.0 * 2.81)  # the larger probe's power
    assert step["one_off_s"] == pytest.approx(2.0)  # the first step's extra time at the first size
    assert step["one_off_joules"] == pytest.approx(60.0)
    assert step["probed_at"] == [2, 4]


def test_run_length_stops_where_the_loop_would_at_each_budget():
    step = {"step_s": 2.0, "joules_per_step": 10.0, "one_off_s": 4.0, "one_off_joules": 20.0}
    whole = costs.run_length(step, steps=100, tokens_per_step=1000)
    assert whole == {"steps": 100, "stopped_by": None, "time_s": 204.0, "joules": 1020.0}
    # 500 J: 20 one-off, then 48 steps of 10 J reach it
    assert costs.run_length(step, 100, 1000, energy_j=500)["steps"] == 48
    assert costs.run_length(step, 100, 1000, energy_j=500)["stopped_by"] == "energy_j"
    assert costs.run_length(step, 100, 1000, time_s=50, tokens=30_500)["steps"] == 23  # time first
    assert costs.run_length(step, 100, 1000, tokens=30_500) == {
        "steps": 31, "stopped_by": "tokens", "time_s": 66.0, "joules": 330.0
    }  # fmt: skip
    assert costs.run_length(step, 10, 1000, energy_j=1e9)["stopped_by"] is None  # budget beyond the run


def test_compare_spreads_the_one_off_cost_over_the_steps_taken():
    f = {"peak_bytes": 110, "step_s": 1.0, "one_off_s": 10.0, "joules_per_step": 5.0, "one_off_joules": 50.0}
    out = costs.compare(f, {"steps": 10, "time_s": 25.0, "peak_bytes": 100, "train_joules": 80.0})
    assert out["peak_bytes"]["ratio"] == pytest.approx(1.1)
    assert out["step_s"]["forecast"] == pytest.approx(2.0) and out["step_s"]["ratio"] == pytest.approx(0.8)
    assert out["train_joules"]["forecast"] == pytest.approx(100.0)
    assert out["train_joules"]["ratio"] == pytest.approx(1.25)
    assert costs.fits(2**30, 100.0, memory_gb=0.5, energy_j=200) == {"memory": False, "energy": True}


def test_the_grid_is_precision_by_lora_by_checkpointing(tiny_llama: Path, corpus_jsonl: Path):
    cfg = _config(tiny_llama, corpus_jsonl, Path("unused"))
    names = [name for name, _ in planner.recipes(cfg, grid=True, device="cpu")]
    # QLoRA (with checkpointing) beside each precision's LoRA, where bitsandbytes is installed
    qlora = importlib.util.find_spec("bitsandbytes") is not None
    assert len(names) == (15 if qlora else 12) and len(set(names)) == len(names)
    assert "fp32 full" in names and "bf16-pure lora ckpt" in names
    assert ("bf16 qlora-nf4 ckpt" in names) == qlora
    gpu = [name for name, _ in planner.recipes(cfg, grid=True, device="NVIDIA H200")]
    assert len(gpu) == (25 if qlora else 20) and "tf32 full ckpt" in gpu and "fp16 lora" in gpu
    assert [name for name, _ in planner.recipes(cfg, grid=False, device="cpu")] == ["fp32 full"]


def _small_llama(folder: Path) -> Path:
    """A Llama large enough (8 blocks of 256) that its tensors, not the interpreter's noise,
    make the resident peak, and deep enough that checkpointing's saving (all blocks'
    activations but one) stands well above that noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.tiny_models import build_tiny_llama

    build_tiny_llama(folder)
    tok_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok_vocab, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=1024, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _config(model: Path, corpus: Path, out: Path, seq: int = 32, **train: object) -> RunConfig:
    return from_dict(
        {
            "model": {"name_or_path": str(model)},
            "data": {"train": [str(corpus)], "text_field": "caption", "max_seq_len": seq, "eval_max_blocks": 4},
            "train": {"micro_batch_size": 8, "max_steps": 12, "lr": 1e-4, "log_every": 4, **train},
            "output": {"dir": str(out)},
        }
    )


@pytest.mark.slow
def test_forecast_against_a_measured_run(tmp_path: Path, corpus_jsonl: Path):
    """The run forecasts itself from its own first steps (measure.forecast): its summary holds
    the forecast beside the measured figures, and they agree, and the forecast cost no window
    of its own (no child process ran). The bands are wider than the 15% / 25% the benchmark
    shows on real models (bench/plan_check.py): this model's tensors are tens of MB, the size of
    the allocator's own noise, and CI machines are shared; a forecast off by a factor of two
    still fails. `ecoadapt plan`'s trial steps forecast the same recipe before training.

    The run is a process of its own, as the trial steps are: run inside this long-lived test
    process it reused pages earlier tests had left resident, and its peak above its baseline read
    low (planned / measured 1.606 once, in a CI run)."""
    model = _small_llama(tmp_path / "small-llama")
    cfg = _config(model, corpus_jsonl, tmp_path / "run", seq=128, compile=False)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    done = subprocess.run([sys.executable, "-m", "ecoadapt", "adapt", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    f = summary["forecast"]
    assert f is not None and "error" not in f, f
    assert f["probed_at"] == [8] and f["steps"] == 12 and f["source"] == "the run's own first 5 steps"
    versus = f["versus_measured"]
    assert versus["peak_bytes"]["measured"] == summary["memory"]["peak_above_baseline_bytes"]
    assert 0.6 < versus["peak_bytes"]["ratio"] < 1.6, versus["peak_bytes"]
    assert 0.5 < versus["step_s"]["ratio"] < 2.0, versus["step_s"]
    print("forecast / measured:", {k: round(v["ratio"], 3) for k, v in versus.items()})
    assert versus["train_joules"]["measured"] == summary["energy"]["train_joules"]
    assert "forecast" not in summary["energy"]["phases"]  # nothing ran apart from training to forecast it
    parts = f["parts_bytes"]
    assert parts["weights"] == 4 * sum(p.numel() for p in _params(model))  # fp32, counted from the shapes
    assert parts["optimizer"] == 2 * parts["weights"]
    # `ecoadapt plan`'s trial steps (child processes) agree with the run's own on memory; a
    # second plan of the same recipe reads the cache: no child process, the same figures.
    planned = planner.recipe_forecast(cfg, 12, planner.measured_trials(cfg))
    assert 0.6 < planned["peak_bytes"] / versus["peak_bytes"]["measured"] < 1.6
    again = planner.measured_trials(cfg)
    assert again["cached"] and again["sizes"] == planner.measured_trials(cfg)["sizes"]


def _params(folder: Path) -> list[torch.nn.Parameter]:
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(folder).parameters())


def test_plan_command_marks_what_does_not_fit(tmp_path: Path, tiny_llama: Path, corpus_jsonl: Path, capsys):
    config = tmp_path / "plan.yaml"
    cfg = _config(tiny_llama, corpus_jsonl, tmp_path / "run").to_dict()
    config.write_text(json.dumps(cfg))
    out_json = tmp_path / "forecast.json"
    code = main(
        ["plan", str(config), "--set", "lora.enabled=true", "--set", "budget.energy_j=1e9", "--json", str(out_json)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "forecast for 12 steps (train.max_steps)" in printed and "fp32 lora" in printed
    saved = json.loads(out_json.read_text())
    (row,) = saved["recipes"]
    per_token = row["joules"] / (12 * 8 * 32) * 1000  # 12 steps of 8 blocks of 32 tokens
    assert row["mj_per_token"] == pytest.approx(per_token) and f"{per_token:.2f}" in printed
    assert row["recipe"] == "fp32 lora" and row["steps"] == 12 and row["energy_method"] == "estimated"
    assert row["joules"] == pytest.approx(row["one_off_joules"] + 12 * row["joules_per_step"])
    # A memory limit below the forecast: the grid is forecast (cached probes where they exist)
    # and nothing fits a 1 MiB limit.
    rows = planner.run(RunConfig.from_yaml(config, ["lora.enabled=true"]), 12, memory_gb=2**-20, grid=False)
    assert rows[0]["fits"]["memory"] is False
    assert "no recipe fits" in planner.table(rows, 2**-20, None)


@pytest.mark.slow
def test_a_probe_that_runs_out_of_memory_says_so(tmp_path: Path, tiny_llama: Path, corpus_jsonl: Path):
    cfg = _config(tiny_llama, corpus_jsonl, tmp_path / "run", max_memory_gb=0.001)
    probed = planner.measured_trials(cfg)
    assert "out_of_memory" in probed and "train.max_memory_gb" in probed["out_of_memory"]
    f = planner.recipe_forecast(cfg, 12, probed)
    assert f["probed_at"] == [2, 4] and "out_of_memory" in f


@pytest.mark.slow
def test_the_probe_trains_as_the_run_does_checkpointing_included(tmp_path: Path, corpus_jsonl: Path):
    """The probe runs in training mode: checkpointing (active only there) keeps fewer
    activations per block row, and dropout draws its masks, as in the run."""
    model = _small_llama(tmp_path / "small-llama")
    plain = planner.measured_trials(_config(model, corpus_jsonl, tmp_path / "a", seq=128, compile=False))
    ckpt = planner.measured_trials(
        _config(model, corpus_jsonl, tmp_path / "b", seq=128, compile=False, gradient_checkpointing=True)
    )
    activations = [costs.per_step(p, 8, 1, 8 * 128)["parts_bytes"]["activations"] for p in (plain, ckpt)]
    # Measured 0.42-0.49 here (0.55 with 4 blocks, 0.75 once on a busy CI machine); no
    # checkpointing at all would read about 1.
    assert activations[1] < 0.75 * activations[0], activations


def test_a_projection_onto_a_gpu_adds_shapes_activations_and_the_cuda_context():
    from ecoadapt.forecast import devices

    probe = {
        "static_bytes": {"weights": 2**30, "gradients": 2**29, "optimizer": 2**29},  # 2 GiB
        "sizes": [{"micro_batch": 1, "peak_bytes": 100 * 2**20}, {"micro_batch": 2, "peak_bytes": 150 * 2**20}],
        "flops_per_token": 6e8,
    }
    a10 = devices.device("a10")  # any case
    row = devices.project(probe, a10, "bf16", micro_batch=8, tokens_per_step=8192, steps=100, mfu=0.3)
    assert row["peak_bytes"] == 2 * 2**30 + 8 * 50 * 2**20 + devices.CUDA_OVERHEAD_BYTES and row["fits"]
    assert row["step_s"] == pytest.approx(8192 * 6e8 / (125e12 * 0.3))  # the A10's dense bf16 peak
    assert row["joules"] == pytest.approx(100 * row["step_s"] * 150)  # at its rated 150 W
    assert row["mj_per_token"] == pytest.approx(1000 * row["joules"] / (100 * 8192))
    t4 = devices.project(probe, devices.device("T4"), "bf16-pure", 8, 8192, 100, 0.3)
    assert t4["compute_dtype"] == "fp32" and "no native bf16" in t4["notes"][0]  # no bf16 tensor cores
    assert t4["step_s"] == pytest.approx(8192 * 6e8 / (8.1e12 * 0.3))
    huge = devices.project({**probe, "static_bytes": {"weights": 30 * 10**9}}, a10, "bf16", 8, 8192, 100, 0.3)
    assert not huge["fits"]  # 30 GB of weights on a 24 GB card
    with pytest.raises(UserError, match="unknown device; known: T4, A10, L4, A100-40GB"):
        devices.device("V100")


def test_a_cpu_machine_is_planned_at_this_cpus_speed_with_its_own_process_in_place_of_a_cuda_context():
    import torch

    from ecoadapt.forecast import devices
    from ecoadapt.measure import flops

    machine = devices.device("CPU-24GB", cpu_watts_per_core=10.0, memory_watts_per_gib=0.5)
    assert machine.kind == "cpu" and machine.capacity_bytes == 24 * 2**30 - int(0.1 * 24 * 2**30)  # 10% to the system
    here = torch.device("cpu")
    assert machine.peaks == {"fp32": flops.peak_flops(here, torch.float32)[0],
                             "bf16": flops.peak_flops(here, torch.bfloat16)[0]}  # fmt: skip
    assert machine.watts == 10.0 * torch.get_num_threads()
    assert machine.overhead_bytes > 50 * 2**20  # the interpreter and the libraries, measured
    probe = {  # from the shapes: no trial steps
        "static_bytes": {"weights": 2**30, "gradients": 2**29, "optimizer": 2**29},
        "activation_bytes_per_row": 50 * 2**20,
        "flops_per_token": 6e8,
    }
    row = devices.project(probe, machine, "bf16-pure", micro_batch=4, tokens_per_step=512, steps=10, mfu=0.5)
    assert row["peak_bytes"] == 2 * 2**30 + 4 * 50 * 2**20 + machine.overhead_bytes and row["fits"]
    assert row["parts_bytes"]["process"] == machine.overhead_bytes and "cuda_context" not in row["parts_bytes"]
    assert row["step_s"] == pytest.approx(512 * 6e8 / (machine.peaks["bf16"] * 0.5))
    assert row["joules"] == pytest.approx(row["time_s"] * (machine.watts + 0.5 * row["peak_bytes"] / 2**30))
    # 22 GiB of weights would fit 24 GiB, not what the system leaves of it.
    huge = devices.project({**probe, "static_bytes": {"weights": 22 * 2**30}}, machine, "fp32", 1, 512, 10, 0.5)
    assert not huge["fits"]
    # Trial steps on this machine: their peak above the baseline plus the process, their own time.
    trial = {**probe, "sizes": [
        {"micro_batch": 1, "micro_s": 2.0, "optimizer_s": 0.5, "step_s": 2.5, "first_step_s": 3.0,
         "peak_bytes": 3 * 2**30, "watts": 12.0},
        {"micro_batch": 2, "micro_s": 3.0, "optimizer_s": 0.5, "step_s": 3.5, "first_step_s": 3.5,
         "peak_bytes": 3 * 2**30 + 2**28, "watts": 12.0},
    ]}  # fmt: skip
    step = costs.per_step(trial, micro_batch=4, grad_accum=2, tokens_per_step=1024)
    measured = devices.from_trial_steps(step, machine, "bf16", tokens_per_step=1024, steps=10)
    assert measured["peak_bytes"] == 3 * 2**30 + 3 * 2**28 + machine.overhead_bytes
    assert measured["peak_bytes"] == sum(measured["parts_bytes"].values())
    assert measured["step_s"] == pytest.approx(2 * 5.0 + 0.5)  # 2 micro-batches of 4 rows, then the optimizer
    assert measured["joules"] == pytest.approx(10 * 10.5 * 12.0)
    with pytest.raises(UserError, match="cpu-1gb: a machine needs more than 1 GiB"):
        devices.device("cpu-1gb")
    # A quantized base's projected time on a CPU leaves out its dequantizing: recommended only
    # where nothing else fits, however few joules it projects.
    lora = {**row, "recipe": "bf16 lora ckpt"}
    qlora = {**row, "recipe": "bf16 qlora-nf4 ckpt", "joules": row["joules"] / 2, "time_understated": True}
    assert "recommended on a CPU machine with 24 GiB of RAM: bf16 lora ckpt" in devices.table(
        [lora, qlora], machine, 0.5
    )
    alone = devices.table([{**lora, "fits": False}, qlora], machine, 0.5)
    assert "recommended on a CPU machine with 24 GiB of RAM: bf16 qlora-nf4 ckpt" in alone


def test_plan_projects_a_recipe_onto_a_gpu_from_this_machines_trial_steps(tmp_path, tiny_llama, corpus_jsonl, capsys):
    config = tmp_path / "plan.yaml"
    config.write_text(json.dumps(_config(tiny_llama, corpus_jsonl, tmp_path / "run").to_dict()))
    out_json = tmp_path / "projection.json"
    assert main(["plan", str(config), "--device", "H100", "--mfu", "0.2", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "projection for NVIDIA H100 SXM 80GB (80 GB, 700 W) at MFU 0.2: not a measurement" in printed
    (row,) = json.loads(out_json.read_text())["recipes"]
    assert row["fits"] and row["compute_dtype"] == "fp32" and row["steps"] == 12
    # The tiny model's FLOPs per token (counted as MFU counts them) over the H100's fp32 peak at 20%.
    from ecoadapt.config import ModelConfig
    from ecoadapt.measure import flops
    from ecoadapt.model import pretrained

    model = pretrained.load(ModelConfig(str(tiny_llama)), 32, seed=0).model
    per_token = flops.training_flops(model, pretrained.transformer_blocks(model)[1], 32, model.config.hidden_size)
    assert row["step_s"] == pytest.approx(8 * 32 * per_token.per_token / (67e12 * 0.2))
    assert row["parts_bytes"]["cuda_context"] == 2**29 and row["parts_bytes"]["weights"] > 0
    # A CPU machine (the system keeps 1 GiB of 8): the same trial steps (cached), at their own
    # measured seconds, not an MFU.
    assert main(["plan", str(config), "--device", "cpu-8gb", "--json", str(out_json)]) == 0
    assert "projection for a CPU machine with 8 GiB of RAM (7.0 GiB usable)" in capsys.readouterr().out
    (on_cpu,) = json.loads(out_json.read_text())["recipes"]
    assert on_cpu["fits"] and on_cpu["peak_bytes"] == sum(on_cpu["parts_bytes"].values())
    assert on_cpu["parts_bytes"]["process"] > 0 and "from the trial steps here" in on_cpu["notes"][0]
    assert on_cpu["step_s"] != pytest.approx(row["step_s"])
    with pytest.raises(UserError, match=r"plan --mfu 2.0: a fraction of the peak"):
        planner.on_device(RunConfig.from_yaml(config), 12, "H100", 2.0)


def test_a_projected_auto_micro_batch_is_what_the_run_would_choose_on_that_gpu():
    from ecoadapt.forecast import devices

    probe = {
        "static_bytes": {"weights": 10**9, "gradients": 10**9, "optimizer": 2 * 10**9},
        "sizes": [{"micro_batch": 1, "peak_bytes": 10**8}, {"micro_batch": 2, "peak_bytes": 2 * 10**8}],  # 100 MB a row
    }
    raw = {"model": {"name_or_path": "m"}, "data": {"train": ["c.txt"], "max_seq_len": 128},
           "train": {"tokens_per_step": 256 * 128, "micro_batch_size": "auto"}}  # fmt: skip
    cfg = from_dict(raw)
    # A10: 0.85 x (24 GB - 1 GB of weights - the CUDA context) - 3 GB to come = 161 rows: 2 x 128.
    assert planner._micro_batch_on(cfg, probe, devices.device("A10")) == 128
    # T4: 0.85 x (16 GB - 1 GB - the context) - 3 GB = 92 rows: 4 x 64.
    assert planner._micro_batch_on(cfg, probe, devices.device("T4")) == 64
    fixed = from_dict({**raw, "train": {"micro_batch_size": 8}})
    assert planner._micro_batch_on(fixed, probe, devices.device("T4")) == 8  # the user's own: kept
