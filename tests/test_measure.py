"""Energy meters, windows and budgets."""

import json
from types import SimpleNamespace

import pytest

from ecoadapt.config import BudgetConfig
from ecoadapt.core.errors import UserError
from ecoadapt.measure import energy, meters
from ecoadapt.measure.budget import Budget
from ecoadapt.train.loop import TrainResult
from helpers.fakes import FakeZeusMonitor, make_zone
from helpers.runs import adapt_summary


class FakeProcess:
    """A process whose CPU time and memory the test sets."""

    def __init__(self):
        self.cpu = 10.0
        self.child_cpu = 0.0
        self.rss = 2 * 2**30

    def cpu_times(self):
        return SimpleNamespace(user=self.cpu, system=0.0, children_user=0.0, children_system=0.0)

    def children(self, recursive=True):
        return [SimpleNamespace(cpu_times=lambda: SimpleNamespace(user=self.child_cpu, system=0.0))]

    def memory_info(self):
        return SimpleNamespace(rss=self.rss)


def test_estimator_arithmetic(monkeypatch):
    clock = iter([100.0, 104.0])
    monkeypatch.setattr(meters.time, "perf_counter", lambda: next(clock))
    proc = FakeProcess()
    meter = meters.EstimateMeter(cpu_watts_per_core=10.0, memory_watts_per_gib=0.5, process=proc)
    proc.cpu += 6.0  # 6 CPU seconds in this process
    proc.child_cpu = 2.0  # and 2 in a child (a data worker, say)
    # 8 CPU-s x 10 W + 2 GiB x 0.5 W/GiB x 4 s wall = 80 + 4 J
    assert meter.total_joules() == pytest.approx(84.0)
    assert meter.method == "estimated"
    assert meter.describe()["cpu_seconds"] == pytest.approx(8.0)


def test_rapl_sums_package_and_dram_and_handles_wraparound(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, 1_000_000_000)
    core = make_zone(tmp_path, "intel-rapl:0:0", "core", 5, 1_000_000_000)
    dram = make_zone(tmp_path, "intel-rapl:0:1", "dram", 1_000_000, 2**32)
    meter = meters.RaplMeter(tmp_path)
    assert sorted(meter.describe()["zones"]) == ["dram", "package-0"]  # core is inside package
    (pkg / "energy_uj").write_text("3000000\n")  # wrapped: +1 J to the top, +3 J after
    (dram / "energy_uj").write_text("1500000\n")  # +0.5 J
    (core / "energy_uj").write_text("900000000\n")  # ignored
    assert meter.total_joules() == pytest.approx(4.5)
    (pkg / "energy_uj").write_text("5000000\n")  # +2 J
    assert meter.total_joules() == pytest.approx(6.5)
    assert meter.method == "measured"


def test_choose_never_falls_back_silently(tmp_path):
    with pytest.raises(UserError, match="measure.energy = rapl: no RAPL zones"):
        meters.choose("rapl", powercap_root=tmp_path)
    auto = meters.choose("auto", powercap_root=tmp_path)
    assert isinstance(auto.meter, meters.EstimateMeter)
    assert any("estimating from CPU time instead" in n for n in auto.notes)
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0, 2**32)
    assert isinstance(meters.choose("auto", powercap_root=tmp_path).meter, meters.RaplMeter)
    assert meters.choose("off").meter is None


class StepMeter:
    """A fake meter that counts 5 J more at every read."""

    name = "fake"
    method = "measured"
    covers = "a fake device"

    def __init__(self):
        self.joules = 0.0

    def total_joules(self):
        self.joules += 5.0
        return self.joules

    def describe(self):
        return {}


def test_tracker_windows_and_summary():
    tracker = energy.EnergyTracker(StepMeter())
    tracker.begin_window("train")
    m = tracker.end_window("train")
    assert m.joules == 5.0 and m.method == "measured" and m.meter == "fake"
    summary = tracker.summary()
    assert summary["joules"] == 5.0 and summary["phases"]["train"]["joules"] == 5.0
    assert energy.EnergyTracker(None).summary() is None


def test_an_inner_window_comes_out_of_the_outer_ones_figures():
    tracker = energy.EnergyTracker(StepMeter())  # +5 J per read
    tracker.begin_window("train")  # read 1: 5
    tracker.begin_window("eval_periodic", within="train")  # read 2: 10
    assert tracker.end_window("eval_periodic").joules == 5.0  # read 3: 15
    assert tracker.running("train") == 20.0 - 5 - 5.0  # read 4: 20; 15 so far, 5 of them evaluation's
    train = tracker.end_window("train")  # read 5: 25
    assert train.joules == 25.0 - 5 - 5.0
    summary = tracker.summary()
    assert summary["joules"] == 20.0  # nothing counted twice
    assert summary["covers"] == "a fake device"


def test_phase_windows_close_on_every_way_out_and_nest():
    import torch

    from ecoadapt.measure.memory import MemoryWindows
    from ecoadapt.measure.phases import Phases

    class Clock:
        def __init__(self):
            self.events = []

        def begin_training(self):
            self.events.append("begin")

        def end_training(self):
            self.events.append("end")

    tracker, memory, clock = energy.EnergyTracker(StepMeter()), MemoryWindows(torch.device("cpu")), Clock()
    phases = Phases(tracker, memory)
    with pytest.raises(RuntimeError, match="mid-phase"), phases.window("train", clock=clock) as train:
        with phases.window("eval", within="train") as inner:
            pass
        raise RuntimeError("mid-phase")
    # Every window closed despite the exception: nothing left open, every figure filled in.
    assert not tracker._open and not memory._open and clock.events == ["begin", "end"]
    assert inner.energy is not None and inner.energy.joules == 5.0  # reads 2 and 3
    assert train.energy is not None and train.energy.joules == 20.0 - 5 - 5.0  # the inner one taken out
    assert train.peaks is not None and train.peaks["peak"] > 0 and set(memory.peaks) == {"train", "eval"}
    assert train.seconds >= inner.seconds > 0
    with phases.window("save", memory=None) as save:
        pass
    assert save.peaks is None and "save" not in memory.peaks and save.energy is not None
    with phases.window("timed", energy=False) as timed:
        pass
    assert timed.energy is None and "timed" not in tracker.windows and timed.peaks is not None


def test_energy_budget_stops_with_a_fake_meter():
    tracker = energy.EnergyTracker(StepMeter())
    budget = Budget(BudgetConfig(energy_j=12.0), tracker.total_joules, total_steps=100)
    result = TrainResult()
    reasons = []
    for step in range(1, 10):
        result.steps = step
        reasons.append(budget.check(result))
    # 5 J per check: 5, 10, 15 -> the third step reaches 12 J
    assert reasons[:3] == [None, None, "energy_j"]
    result.steps, result.stopped_by = 3, "energy_j"
    summary = budget.summary(result)
    assert summary["stopped_by"] == "energy_j" and summary["used"]["energy_j"] >= 12.0


def test_time_and_token_budgets_and_forecast():
    said = []
    budget = Budget(BudgetConfig(time_s=10.0, tokens=1000), lambda: 0.0, total_steps=30, say=said.append)
    result = TrainResult(steps=3, tokens=300, time_s=2.0)
    assert budget.check(result) is None
    assert said and "time_s: needs ~20 s of 10" in said[0] and "tokens: needs ~3,000 tokens of 1,000" in said[0]
    assert budget.check(TrainResult(steps=4, tokens=1000, time_s=2.5)) == "tokens"
    assert budget.check(TrainResult(steps=5, tokens=500, time_s=10.5)) == "time_s"
    assert not Budget(BudgetConfig(), lambda: 0.0, 10).active


def test_adapt_stopped_by_budget_leaves_a_usable_adapter(tmp_path, tiny_llama, corpus_jsonl):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ecoadapt.cli import main

    out = tmp_path / "run"
    args = [
        "adapt", "-", "--set", f"model.name_or_path={tiny_llama}", "--set", f"data.train={corpus_jsonl}",
        "--set", "data.text_field=caption", "--set", "data.max_seq_len=16", "--set", "data.eval_fraction=0.1",
        "--set", "train.max_steps=1000", "--set", "train.micro_batch_size=2", "--set", "budget.tokens=256",
        "--set", "lora.enabled=true", "--set", "measure.energy=estimate", "--set", f"output.dir={out}",
    ]  # fmt: skip
    (tmp_path / "empty.yaml").write_text("{}\n")
    args[1] = str(tmp_path / "empty.yaml")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped_by_budget"
    assert summary["steps"] == 8  # 8 steps x 2 blocks x 16 tokens = 256
    assert summary["budget"]["stopped_by"] == "tokens"
    e = summary["energy"]
    assert e["method"] == "estimated" and e["joules"] > 0 and e["train_joules"] > 0
    assert {"load", "eval", "train", "eval_after", "save"} <= e["phases"].keys()
    assert "cpu_watts_per_core" in e["details"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert isinstance(PeftModel.from_pretrained(base, out / "adapter"), PeftModel)


def test_zeus_gpu_meter_chains_windows_without_gaps(monkeypatch):
    import sys

    fake = SimpleNamespace(ZeusMonitor=FakeZeusMonitor)
    monkeypatch.setitem(sys.modules, "zeus.monitor", fake)
    meter = meters.ZeusGpuMeter([0, 1])
    assert meter.total_joules() == pytest.approx(2 * 2.0)  # one tick, two GPUs
    assert meter.total_joules() == pytest.approx(2 * 4.0)
    assert meter.monitor.open.keys() == {"ecoadapt-2"}  # exactly one window left open
    chosen = meters.choose("auto", gpu_indices=[0])
    assert isinstance(chosen.meter, meters.ZeusGpuMeter) and chosen.meter.method == "measured"


class SteppingCounterMonitor(FakeZeusMonitor):
    """NVML's counter moves in steps: every other window reads 0 J (and Zeus warns), the next
    one the energy of both, as on the H200 (a 0.08 s phase read 0 J)."""

    pending = 0.0

    def end_window(self, key, sync_execution=True):
        import warnings

        joules = 2.0 * (self.clock - self.open.pop(key))
        if self.clock % 2:
            self.pending += joules
            warnings.warn("The energy consumption of one or more GPUs was measured as zero. ...", stacklevel=1)
            return SimpleNamespace(gpu_energy=dict.fromkeys(self.gpu_indices, 0.0), time=1.0)
        joules, self.pending = joules + self.pending, 0.0
        return SimpleNamespace(gpu_energy=dict.fromkeys(self.gpu_indices, joules), time=1.0)


def test_zeus_short_windows_read_zero_but_the_total_stays_exact_and_quiet(monkeypatch):
    import sys
    import warnings

    monkeypatch.setitem(sys.modules, "zeus.monitor", SimpleNamespace(ZeusMonitor=SteppingCounterMonitor))
    meter = meters.ZeusGpuMeter([0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Zeus's warning would fail the test
        reads = [meter.total_joules() for _ in range(4)]
    assert reads == [2.0, 2.0, 6.0, 6.0]  # 2 J per window: a zero window's energy lands in the next
    assert "0 J" in meter.describe()["resolution"]


def test_nvml_without_zeus_is_an_error_and_auto_says_gpu_not_counted(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zeus.monitor", None)  # import fails
    with pytest.raises(UserError, match=r"measure.energy = nvml: .*ecoadapt\[energy\]"):
        meters.choose("nvml", gpu_indices=[0])
    chosen = meters.choose("auto", gpu_indices=[0])
    assert isinstance(chosen.meter, meters.EstimateMeter)
    assert "GPU's own energy is not counted" in chosen.notes[0]


def test_flop_count_matches_a_hand_computation(tiny_llama):
    from ecoadapt.config import LoraConfig, ModelConfig, TrainConfig
    from ecoadapt.measure import flops
    from ecoadapt.model import adapters, pretrained

    seq, d, ff = 16, 32, 64
    block = 4 * d * d + 3 * d * ff  # q, k, v, o + gate, up, down
    loaded = pretrained.load(ModelConfig(str(tiny_llama)), seq)
    vocab = loaded.model.config.vocab_size
    head = d * vocab
    attention = 4 * seq * d
    _, blocks = pretrained.transformer_blocks(loaded.model)
    full = flops.training_flops(loaded.model, blocks, seq, d)
    assert full.per_token == 6 * (2 * block + head) + 12 * 2 * seq * d  # the usual 6N + 12 L s d
    assert full.lowest_trained_block == 0

    loaded = pretrained.load(ModelConfig(str(tiny_llama)), seq)
    model, _ = adapters.prepare(loaded, TrainConfig(trainable_layers=1), LoraConfig())
    _, blocks = pretrained.transformer_blocks(model)
    top = flops.training_flops(model, blocks, seq, d)
    forward = 2 * (2 * block + head) + 2 * attention
    backward = 2 * head + (2 * block + 2 * attention + 2 * block)  # tied head frozen; block 1 only
    assert (top.forward, top.backward, top.lowest_trained_block) == (forward, backward, 1)

    mlm = flops.training_flops(loaded.model, blocks, seq, d, head_fraction=0.15)
    assert mlm.forward == pytest.approx(2 * 2 * block + 2 * attention + 2 * head * 0.15)


def test_peak_probe_is_cached_and_can_be_given(tmp_path):
    import torch

    from ecoadapt.measure import flops

    cpu = torch.device("cpu")
    assert flops.peak_flops(cpu, torch.float32, given=1e12) == (1e12, "given")
    value, source = flops.peak_flops(cpu, torch.float32)
    assert source == "measured" and 1e8 < value < 1e14
    assert flops.peak_flops(cpu, torch.float32) == (value, "cache")
    report = flops.mfu_report(flops.FlopCount(6e6, 2e6, 4e6, 0), tokens_per_s=1000, peak=1e10, peak_source="given")
    assert report["mfu"] == pytest.approx(0.6)


def test_early_stop_rule():
    from ecoadapt.train.early_stop import EarlyStop

    stop = EarlyStop(patience=2, min_delta=0.1)
    assert [stop.update(s, loss) for s, loss in [(1, 5.0), (2, 4.0), (3, 3.95), (4, 3.99)]] == [
        False, False, False, True,
    ]  # fmt: skip
    assert stop.best == 4.0 and len(stop.history) == 4
    assert not any(EarlyStop(None).update(s, 1.0) for s in range(10))


def test_adapt_early_stop_and_idle_and_co2(tmp_path, tiny_llama, corpus_jsonl):

    out = tmp_path / "run"
    sets = {
        "model.name_or_path": tiny_llama, "data.train": corpus_jsonl, "data.text_field": "caption",
        "data.max_seq_len": 16, "data.eval_fraction": 0.1, "train.max_steps": 400, "train.micro_batch_size": 2,
        "train.lr": 1e-6, "train.eval_every": 2, "train.early_stop": 2, "train.early_stop_delta": 0.5,
        "measure.energy": "estimate", "measure.idle_s": 0.2, "measure.grid_g_co2_per_kwh": 400,
        "output.dir": out,
    }  # fmt: skip
    summary = adapt_summary(tmp_path, sets)
    # lr 1e-6 cannot lower the loss by 0.5: the first evaluation sets the best, two more stop it.
    assert summary["status"] == "completed" and summary["stopped_by"] == "early_stop"
    assert summary["steps"] == 6 and len(summary["early_stop"]["history"]) == 3
    e = summary["energy"]
    assert "eval_periodic" in e["phases"] and e["train_joules"] == pytest.approx(e["phases"]["train"]["joules"])
    assert e["idle_watts"] >= 0 and e["joules_above_idle"] <= e["joules"]
    assert e["co2e_g"] == pytest.approx(e["joules"] / 3.6e6 * 400)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [r["step"] for r in evals] == [2, 4, 6]
