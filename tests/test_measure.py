"""Energy meters, windows and budgets."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ecoadapt.config import BudgetConfig
from ecoadapt.errors import UserError
from ecoadapt.measure import energy
from ecoadapt.measure.budget import Budget
from ecoadapt.train import TrainResult


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
    monkeypatch.setattr(energy.time, "perf_counter", lambda: next(clock))
    proc = FakeProcess()
    meter = energy.EstimateMeter(cpu_watts_per_core=10.0, memory_watts_per_gib=0.5, process=proc)
    proc.cpu += 6.0  # 6 CPU seconds in this process
    proc.child_cpu = 2.0  # and 2 in a child (a data worker, say)
    # 8 CPU-s x 10 W + 2 GiB x 0.5 W/GiB x 4 s wall = 80 + 4 J
    assert meter.total_joules() == pytest.approx(84.0)
    assert meter.method == "estimated"
    assert meter.describe()["cpu_seconds"] == pytest.approx(8.0)


def make_zone(root: Path, name: str, label: str, uj: int, max_uj: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_sums_package_and_dram_and_handles_wraparound(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, 1_000_000_000)
    core = make_zone(tmp_path, "intel-rapl:0:0", "core", 5, 1_000_000_000)
    dram = make_zone(tmp_path, "intel-rapl:0:1", "dram", 1_000_000, 2**32)
    meter = energy.RaplMeter(tmp_path)
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
        energy.choose("rapl", powercap_root=tmp_path)
    auto = energy.choose("auto", powercap_root=tmp_path)
    assert isinstance(auto.meter, energy.EstimateMeter)
    assert any("estimating from CPU time instead" in n for n in auto.notes)
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0, 2**32)
    assert isinstance(energy.choose("auto", powercap_root=tmp_path).meter, energy.RaplMeter)
    assert energy.choose("off").meter is None


class StepMeter:
    """A fake meter that counts 5 J more at every read."""

    name = "fake"
    method = "measured"

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


def test_energy_budget_stops_with_a_fake_meter():
    tracker = energy.EnergyTracker(StepMeter())
    budget = Budget(BudgetConfig(energy_j=12.0), tracker, total_steps=100)
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
    budget = Budget(BudgetConfig(time_s=10.0, tokens=1000), energy.EnergyTracker(None), total_steps=30, say=said.append)
    result = TrainResult(steps=3, tokens=300, time_s=2.0)
    assert budget.check(result) is None
    assert said and "time_s: needs ~20 s of 10" in said[0] and "tokens: needs ~3,000 tokens of 1,000" in said[0]
    assert budget.check(TrainResult(steps=4, tokens=1000, time_s=2.5)) == "tokens"
    assert budget.check(TrainResult(steps=5, tokens=500, time_s=10.5)) == "time_s"
    assert not Budget(BudgetConfig(), energy.EnergyTracker(None), 10).active


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
