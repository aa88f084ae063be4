"""Stand-ins for hardware the tests do not have: RAPL zones, Zeus's GPU monitor, a device that
runs out of memory; and a tiny training loop to exercise them on."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ecoadapt.config import LoraConfig, ModelConfig, TrainConfig
from ecoadapt.data.batches import BlockLoader
from ecoadapt.model import adapters, parallel, pretrained
from ecoadapt.model.precision import Policy
from ecoadapt.results import rundir
from ecoadapt.train import checkpoint
from ecoadapt.train.loop import Loop


def make_zone(root: Path, name: str, label: str, uj: int, max_uj: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


class FakeZeusMonitor:
    """Stands in for zeus.monitor.ZeusMonitor: each GPU gains 2 J per window opened so far."""

    def __init__(self, gpu_indices, cpu_indices):
        self.gpu_indices = gpu_indices
        self.open = {}
        self.clock = 0

    def begin_window(self, key, sync_execution=True):
        self.clock += 1
        self.open[key] = self.clock

    def end_window(self, key, sync_execution=True):
        start = self.open.pop(key)
        joules = 2.0 * (self.clock - start)
        return SimpleNamespace(gpu_energy=dict.fromkeys(self.gpu_indices, joules), time=1.0)


def tiny_loop(folder, tmp_path, train: TrainConfig, lora=False):
    loaded = pretrained.load(ModelConfig(str(folder)), 16, seed=0)
    model, _ = adapters.prepare(loaded, train, LoraConfig(enabled=lora, r=4))
    blocks = torch.randint(5, 30, (16, 16), generator=torch.Generator().manual_seed(1))
    loader = BlockLoader(blocks, train.micro_batch_size, loaded.objective, None, 0)
    torch.manual_seed(0)
    policy = Policy("fp32", "cpu")
    loop = Loop.create(model, train.max_steps or 1, train, policy, loaded.objective, torch.device("cpu"))
    checkpoints = checkpoint.RunCheckpoints(tmp_path / rundir.CHECKPOINT_FILE, loader, True)
    return loop, loader, checkpoints


def refuse_batches_over(model, rows):
    """Simulate a device that runs out of memory on more than ``rows`` blocks per micro-batch."""

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    dict(parallel.unwrap(model).named_modules())["model"].register_forward_pre_hook(hook, with_kwargs=True)  # decoder
