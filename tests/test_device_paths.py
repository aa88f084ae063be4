"""The GPU and multi-process paths, proved on CPU: fakes of the CUDA and NVML calls.

Each test here failed on the code before issue 14's fixes (see its docstring for the defect).
"""

import gc
import sys
from types import SimpleNamespace

import pytest
import torch

from ecoadapt.config import LoraConfig, ModelConfig, TrainConfig
from ecoadapt.core.errors import UserError
from ecoadapt.measure import energy, flops, memory, meters
from ecoadapt.model import parallel, pretrained
from ecoadapt.model.precision import Policy
from ecoadapt.train import checkpoint
from ecoadapt.train.heldout import heldout
from ecoadapt.train.loop import accumulate, fit
from ecoadapt.train.micro_batch import is_out_of_memory
from helpers.fakes import FakeZeusMonitor, make_zone, refuse_batches_over, tiny_loop


def fake_cuda(monkeypatch, count=1, capability=(8, 0), native_bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)

    def is_bf16_supported(including_emulation=True):
        return native_bf16 or including_emulation  # emulation counts unless asked not to

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_more_ranks_than_gpus_is_a_one_line_error_naming_both_counts(monkeypatch):
    """1: set_device(LOCAL_RANK) died with a raw 'invalid device ordinal'."""
    fake_cuda(monkeypatch, count=1)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    with pytest.raises(UserError, match=r"2 processes on this machine but rank 1 sees 1 GPU\(s\).*nproc=1"):
        parallel.setup("auto", "auto", 10.0)


def test_tf32_is_forced_off_outside_tf32_mode_and_restored(monkeypatch):
    """9: TF32 flags were set process-wide, never restored, and fp32 never forced them off."""
    fake_cuda(monkeypatch, capability=(8, 0))
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = True  # left on by an earlier run, or a library
        policy = Policy("fp32", "cuda")
        assert matmul.allow_tf32 is False and cudnn.allow_tf32 is False
        policy.restore()
        assert matmul.allow_tf32 is True
        tf32 = Policy("tf32", "cuda")
        assert matmul.allow_tf32 is True and not tf32.notes
        fake_cuda(monkeypatch, capability=(7, 0))
        old = Policy("tf32", "cuda")
        assert matmul.allow_tf32 is False and "before Ampere" in old.notes[0]
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_bf16_emulation_is_named(monkeypatch):
    """9: is_bf16_supported() counted emulation, so T4/V100 never got the note."""
    fake_cuda(monkeypatch, capability=(7, 5), native_bf16=False)
    assert any("no native bfloat16" in n for n in Policy("bf16", "cuda").notes)
    fake_cuda(monkeypatch, capability=(9, 0), native_bf16=True)
    assert not Policy("bf16", "cuda").notes


def test_checkpoint_keeps_the_training_gpus_rng_only(monkeypatch, tmp_path, tiny_llama):
    """8: every visible GPU's RNG state was saved; a resume seeing fewer GPUs raised IndexError."""
    states = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device.index: state}))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state read"))
    cfg = TrainConfig(max_steps=2, micro_batch_size=2)
    loop, loader, _ = tiny_loop(tiny_llama, tmp_path, cfg)
    gpu1 = torch.device("cuda", 1)
    state = checkpoint.capture(loop.model, loop.policy, loop.optimizer, loop.scheduler, loader, {}, {}, gpu1)
    assert torch.equal(state["rng"]["cuda"], states[1])
    checkpoint.restore(state, loop.model, loop.policy, loop.optimizer, loop.scheduler, loader, torch.device("cuda", 0))
    assert torch.equal(restored[0], states[1])  # onto the GPU the resumed run trains on


def test_cublas_allocation_failure_counts_as_out_of_memory(tmp_path, tiny_llama):
    """6: cuBLAS allocation failures arrive as a plain RuntimeError and were not retried."""
    cfg = TrainConfig(max_steps=2, micro_batch_size=4, lr=1e-2, auto_micro_batch=True)
    loop, loader, _ = tiny_loop(tiny_llama, tmp_path, cfg)

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    dict(parallel.unwrap(loop.model).named_modules())["model"].register_forward_pre_hook(hook, with_kwargs=True)
    result = fit(loop, loader)
    assert result.steps == 2 and result.micro_batch_splits == 2
    assert not is_out_of_memory(RuntimeError("shape mismatch"))  # other errors stay errors


def test_out_of_memory_in_the_optimizer_step_is_a_clear_error(tmp_path, tiny_llama, monkeypatch):
    """6: an OOM in the optimizer step (Adam's first state allocation) was not caught."""
    cfg = TrainConfig(max_steps=2, micro_batch_size=2)
    loop, loader, _ = tiny_loop(tiny_llama, tmp_path, cfg)

    def step(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(loop.policy, "step", step)
    with pytest.raises(UserError, match="out of memory in the optimizer step.*use LoRA"):
        fit(loop, loader)


def test_evaluation_out_of_memory_halves_its_batch_with_the_same_result(tiny_llama):
    """6: an OOM in evaluation was not caught."""
    model = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0).model
    blocks = torch.randint(5, 30, (8, 16), generator=torch.Generator().manual_seed(4))
    policy, cpu = Policy("fp32", "cpu"), torch.device("cpu")
    whole = heldout(model, blocks, "clm", None, 1, policy, cpu)
    refuse_batches_over(model, 2)
    halved = heldout(model, blocks, "clm", None, 8, policy, cpu)
    assert halved.batch_size == 2
    assert halved.loss == pytest.approx(whole.loss, rel=1e-6)
    assert halved.target_tokens == whole.target_tokens


def test_zeus_without_an_energy_counter_is_labelled_sampled(monkeypatch):
    """7: GPUs before Volta are polled (0 J for short windows, gaps lost), still labelled plainly."""

    class OldGpus(FakeZeusMonitor):
        def __init__(self, gpu_indices, cpu_indices):
            super().__init__(gpu_indices, cpu_indices)
            self.gpus = SimpleNamespace(supports_get_total_energy_consumption=lambda i: i != 1)

    monkeypatch.setitem(sys.modules, "zeus.monitor", SimpleNamespace(ZeusMonitor=OldGpus))
    meter = meters.ZeusGpuMeter([0, 1])
    assert meter.name == "zeus-nvml-sampled" and meter.describe()["sampled_gpus"] == [1]
    assert "gaps between reads are not counted" in meter.describe()["note"]
    monkeypatch.setitem(sys.modules, "zeus.monitor", SimpleNamespace(ZeusMonitor=FakeZeusMonitor))
    assert meters.ZeusGpuMeter([0]).name == "zeus-nvml"


def test_the_meter_probe_builds_and_reads_the_real_meter(monkeypatch, capsys):
    """5: gpu.sh checked only `import zeus`; a meter that cannot be built failed every point."""
    from ecoadapt.cli import main

    class NoNvml:
        def __init__(self, gpu_indices, cpu_indices):
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "zeus", SimpleNamespace())  # importable
    monkeypatch.setitem(sys.modules, "zeus.monitor", SimpleNamespace(ZeusMonitor=NoNvml))
    assert main(["meters", "--need", "nvml"]) == 1
    assert "nvml: cannot read: RuntimeError: Zeus cannot read NVML" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "zeus.monitor", SimpleNamespace(ZeusMonitor=FakeZeusMonitor))
    assert main(["meters", "--need", "nvml"]) == 0
    assert "nvml: reads (measured)" in capsys.readouterr().out


def test_cpu_energy_is_reported_beside_the_gpus_and_labelled(monkeypatch, tmp_path):
    """13: NVML runs left CPU and DRAM energy out without saying so."""
    monkeypatch.setitem(sys.modules, "zeus.monitor", SimpleNamespace(ZeusMonitor=FakeZeusMonitor))
    from ecoadapt.config import MeasureConfig

    monkeypatch.setattr(meters, "POWERCAP_ROOT", tmp_path)
    tracker = energy.EnergyTracker.for_config(MeasureConfig(energy="nvml"), "cuda", 0, 0, print)
    assert tracker.not_covered and "CPU and DRAM" in tracker.not_covered  # no RAPL zones yet
    zone = make_zone(tmp_path, "intel-rapl:0", "package-0", 0, 2**32)
    tracker = energy.EnergyTracker.for_config(MeasureConfig(energy="nvml"), "cuda", 0, 0, print)
    tracker.begin_window("train")
    (zone / "energy_uj").write_text("7000000\n")  # the CPU package drew 7 J meanwhile
    tracker.end_window("train")
    summary = tracker.summary()
    assert summary["covers"] == "GPU" and summary["method"] == "measured"
    assert summary["beside"]["rapl"]["joules"] == pytest.approx(7.0)
    assert summary["beside"]["rapl"]["covers"].startswith("CPU package and DRAM")
    assert summary["joules"] == summary["phases"]["train"]["joules"]  # the CPU's are beside, not added


def test_rank_energy_is_summed_and_derived_figures_recomputed():
    """3: co2e, joules above idle and idle watts were rank 0's; phase seconds were summed."""
    rank = {
        "method": "measured", "meter": "zeus-nvml", "covers": "GPU", "details": {},
        "phases": {"train": {"joules": 100.0, "seconds": 10.0}, "eval": {"joules": 10.0, "seconds": 1.0}},
        "idle_watts": 2.0, "grid_g_co2_per_kwh": 360.0,
    }  # fmt: skip
    ranks = [energy.with_totals({**rank, "phases": {k: dict(v) for k, v in rank["phases"].items()}}) for _ in range(2)]
    ranks[1]["phases"]["train"]["seconds"] = 12.0  # the slower rank
    job = energy.combine_ranks(ranks)
    assert job["joules"] == pytest.approx(220.0) and job["phases"]["train"]["joules"] == pytest.approx(200.0)
    assert job["phases"]["train"]["seconds"] == pytest.approx(12.0)  # wall time, once
    assert job["idle_watts"] == pytest.approx(4.0)
    assert job["joules_above_idle"] == pytest.approx(220.0 - 4.0 * 13.0)
    assert job["co2e_g"] == pytest.approx(220.0 / 3.6e6 * 360.0)
    assert job["per_rank_joules"] == [110.0, 110.0]


def test_nested_memory_windows_keep_each_windows_own_peak():
    """2: training's peak was read after evaluation, which built the largest tensors."""
    if not memory.reset_rss_peak():
        pytest.skip("this kernel cannot reset the resident high-water mark")
    windows = memory.MemoryWindows(torch.device("cpu"))
    windows.begin("train")
    small = torch.ones(16 * 2**20 // 4)  # 16 MiB
    windows.begin("eval")
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    del big
    windows.end("eval")
    del small
    windows.end("train")
    assert windows.peaks["eval"]["peak"] - windows.peaks["train"]["peak"] > 150 * 2**20
    report = windows.report(rss_before_load=0)
    assert report["peak_bytes"] == report["train_peak_bytes"] < report["eval_peak_bytes"]
    assert "reset at the start of each window" in report["windows"]


def test_a_cached_peak_below_what_a_run_achieved_is_probed_again(monkeypatch):
    """Also found: a peak probed once on a busy machine poisoned every later run's MFU."""
    probes = iter([90e9, 270e9])
    monkeypatch.setattr(flops, "measure_peak", lambda device, dtype: next(probes))
    cpu = torch.device("cpu")
    assert flops.peak_flops(cpu, torch.float32) == (90e9, "measured")
    assert flops.peak_flops(cpu, torch.float32, at_least=50e9) == (90e9, "cache")
    assert flops.peak_flops(cpu, torch.float32, at_least=120e9) == (270e9, "measured")  # probed again
    assert flops.peak_flops(cpu, torch.float32) == (270e9, "cache")  # the best ever seen is kept


def test_a_layer_map_mixing_dtypes_inside_an_fsdp_unit_is_refused(tiny_llama):
    """12: mixed dtypes inside one FSDP2 unit failed inside FSDP."""
    from ecoadapt.model import layerwise

    model = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0).model
    _, blocks = pretrained.transformer_blocks(model)
    layerwise.apply_map(model, {"*.layers.*": "bf16", "*norm*": "fp32"}, "cpu", None)
    with pytest.raises(UserError, match=r"block 0 mixes bfloat16, float32.*map whole blocks"):
        parallel.check_fsdp_units(model, blocks)
    uniform = pretrained.load(ModelConfig(str(tiny_llama)), 16, seed=0).model
    layerwise.apply_map(uniform, {"*.layers.*": "bf16"}, "cpu", None)
    parallel.check_fsdp_units(uniform, pretrained.transformer_blocks(uniform)[1])  # whole blocks: fine


def test_the_fast_loss_runs_under_ddp(tmp_path, tiny_bert, monkeypatch):
    """11: under DDP/FSDP the chunked loss and the masked-rows head were bypassed."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ecoadapt.model import adapters, losses

    calls = []
    real = losses.linear_cross_entropy_sum
    monkeypatch.setattr(losses, "linear_cross_entropy_sum", lambda *a: calls.append(1) or real(*a))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        loaded = pretrained.load(ModelConfig(str(tiny_bert)), 16, seed=0)
        model, _ = adapters.prepare(loaded, TrainConfig(), LoraConfig())
        wrapped = DistributedDataParallel(losses.LossModule(model, "mlm"))
        ids = torch.randint(5, 30, (2, 16), generator=torch.Generator().manual_seed(5))
        labels = torch.full_like(ids, -100)
        labels[:, ::3] = ids[:, ::3]
        batch = [{"input_ids": ids, "labels": labels}]
        model.eval()  # no dropout: the wrapped and the plain loss see the same function
        loss, _, n_targets = accumulate(wrapped, batch, "mlm", Policy("fp32", "cpu"), torch.device("cpu"))
        assert calls, "the chunked masked-rows head was not used under DDP"
        with torch.no_grad():
            plain = losses.training_loss_sum(model, ids, labels, "mlm")
        assert float(loss) == pytest.approx(float(plain) / n_targets, rel=1e-6)
        assert parallel.unwrap(wrapped) is model
    finally:
        # DDP's reducer holds the process group: free it while the group is alive. Freed after
        # destroy_process_group (when the test returned), gloo's destructor sometimes hung
        # joining its threads, and the whole suite with it.
        wrapped = None
        gc.collect()
        dist.destroy_process_group()


def test_ranks_stop_and_evaluate_at_the_same_steps_whatever_signals_each_sees(tmp_path):
    """4: per-rank stop checks let one rank skip a periodic evaluation (collectives inside) that
    another ran: a hang until the collective timeout."""
    import json
    import subprocess
    from pathlib import Path

    helper = Path(__file__).parent / "helpers" / "stop_rule_ranks.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(helper)]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same decisions and evaluations on both ranks
    assert ranks[0]["log"][-1] == [5, "interrupted"]  # rank 0's signal decides; rank 1's alone does not
    assert ranks[0]["evaluated"] == [2, 4]


def test_summary_reports_trainings_own_peak_when_evaluation_needs_more(tmp_path, tiny_llama, corpus_jsonl, monkeypatch):
    """2: the peak was read after the evaluation, which can outgrow a frugal recipe's training."""
    import json

    from ecoadapt.cli import main
    from ecoadapt.commands import adapt
    from helpers.runs import write_config

    if not memory.reset_rss_peak():
        pytest.skip("this kernel cannot reset the resident high-water mark")
    real = adapt.heldout

    def hungry_heldout(*args, **kwargs):
        scratch = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched: evaluation's own cost
        del scratch
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt, "heldout", hungry_heldout)
    path = write_config(tmp_path, tiny_llama, corpus_jsonl, measure={"energy": "estimate"})
    assert main(["adapt", str(path)]) == 0
    mem = json.loads((tmp_path / "run" / "summary.json").read_text())["memory"]
    assert mem["eval_peak_bytes"] - mem["train_peak_bytes"] > 200 * 2**20
    assert mem["peak_bytes"] == mem["train_peak_bytes"]
    assert mem["peak_above_baseline_bytes"] == mem["train_peak_above_baseline_bytes"] < 200 * 2**20


def test_max_memory_gb_caps_the_cuda_allocator(monkeypatch):
    """6: train.max_memory_gb limits a GPU's allocator (so a forced OOM takes the real path)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    gpu = torch.device("cuda", 0)
    assert memory.cap_cuda_memory(gpu, 20.0) == pytest.approx(0.25)
    assert memory.cap_cuda_memory(gpu, 500.0) == 1.0  # never above the whole GPU
    assert calls == [(pytest.approx(0.25), gpu), (1.0, gpu)]


def test_adamw_takes_the_fused_kernel_and_matches_the_foreach_one():
    """One kernel for every parameter's update (on this CPU 3.6x faster than foreach, BENCHMARKS.md)."""
    from ecoadapt.train.param_groups import adamw

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    start = [w.detach().clone() for w in weights]
    fused = adamw([{"params": weights, "weight_decay": 0.01}], 1e-2)
    foreach = torch.optim.AdamW([{"params": twins, "weight_decay": 0.01}], lr=1e-2, foreach=True)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for a, b in zip(weights, twins, strict=True):
            a.grad = b.grad = torch.randn_like(a)
        fused.step()
        foreach.step()
    for a, b, a0 in zip(weights, twins, start, strict=True):
        torch.testing.assert_close(a, b)
        assert (a - a0).abs().max() > 1e-3  # 3 steps of about lr each moved every weight
