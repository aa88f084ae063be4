"""Host-side cost of one training step: ecoadapt's loop beside a bare Hugging Face loop.

On a GPU, a small model's step is bound by the host (Python, dispatch, kernel launches), not
by the GPU's arithmetic: the first H200 run (BENCHMARKS.md) trained SmolLM2-135M at the same
~30k tokens/s in tf32, fp16, bf16 and bf16-pure, at 4% MFU. Every ATen op the host dispatches
is at least one kernel launch there, so the op count per step and the host time per step are
device-independent measures of that bound, and they can be taken on a CPU.

The model: SmolLM2-135M's depth (30 Llama blocks, 9 heads, 3 KV heads) at a width of 72 and a
vocabulary of 512, randomly initialised: the op count is the full model's (it depends on the
depth, not the width). Both loops train it the same way (bf16 autocast, AdamW, clipping at 1.0,
8 x 128 tokens a step):

- bare: ``model(input_ids, labels=...).loss.backward()``, ``clip_grad_norm_``, ``AdamW.step``,
  ``zero_grad``: the minimum a Hugging Face training loop does (no logging, no checks).
- ecoadapt: the run's own objects (``prepare.build``, ``train.Loop``, ``train.accumulate``,
  ``train.apply_step``): precision policy, loss module, finiteness check, schedule.

    python bench/step_overhead.py                 # both loops, bf16 (about a minute)
    python bench/step_overhead.py --mode fp32 --json bench/results/step_overhead.json

Reports ATen ops per step (counted with a TorchDispatchMode), those that compute (views and
host scalar reads left out: each of the rest launches at least one kernel on a GPU), CPU
milliseconds per step here (median; this CPU's arithmetic included, so no GPU figure), and with
--profile ecoadapt's top Python functions by own time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench helpers beside this file

BATCH, SEQ = 8, 128


# Ops that launch no kernel: reading a host scalar (Adam's step counts live on the host, on a
# GPU too) and the like; views are told apart by the op's own schema (OpOverload.is_view).
NO_KERNEL = {"_local_scalar_dense", "_unsafe_view", "lift_fresh", "empty", "empty_strided"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched, and those of them that compute (a kernel launch each,
    at least, on a GPU): views and host scalar reads left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        if not func.is_view and name not in NO_KERNEL:
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


def deep_thin_model(folder: Path) -> Path:
    """SmolLM2-135M's depth at a width of 72 and a 512-token vocabulary (random weights)."""
    from random_llama import build

    return build(folder, hidden=72, intermediate=192, vocab=512, tokenizer_vocab=512, max_positions=SEQ)


def run_config(model: Path, mode: str, out: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"train": ["builtin:python-docstrings"], "max_seq_len": SEQ, "eval_max_blocks": 2},
        "train": {"micro_batch_size": BATCH, "max_steps": 1000, "lr": 1e-4, "compile": False, "max_grad_norm": 1.0},
        "precision": {"mode": mode},
        "measure": {"energy": "off", "forecast": False},
        "output": {"dir": str(out)},
    }


def ecoadapt_step(model_dir: Path, mode: str, out: Path) -> Callable[[], None]:
    """One optimizer step of the run's own loop objects."""
    from ecoadapt.config import from_dict
    from ecoadapt.data import corpus
    from ecoadapt.data.batches import BlockLoader
    from ecoadapt.model import parallel, pretrained
    from ecoadapt.train import prepare
    from ecoadapt.train.loop import Loop, accumulate, apply_step

    cfg = from_dict(run_config(model_dir, mode, out), "step_overhead")
    loaded = pretrained.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)
    blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective)
    device = torch.device("cpu")
    built = prepare.build(cfg, loaded, blocks.train, device, parallel.World(), lambda _: None)
    loop = Loop.create(built.model, 1000, cfg.train, built.policy, loaded.objective, device)
    loader = BlockLoader(blocks.train, BATCH, loaded.objective, None, cfg.train.seed)
    batches = [next(loader) for _ in range(4)]
    count = iter(range(10**9))

    def step() -> None:
        micro = [batches[next(count) % len(batches)]]
        loss, _, _ = accumulate(loop.model, micro, loaded.objective, built.policy, device)
        apply_step(loop, loss)

    return step


def bare_step(model_dir: Path, mode: str) -> Callable[[], None]:
    """The minimum Hugging Face loop, in the same precision."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if mode == "bf16-pure" else None)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=generator) for _ in range(4)]
    count = iter(range(10**9))
    autocast = mode == "bf16"

    def step() -> None:
        ids = batches[next(count) % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(step: Callable[[], None], steps: int, profile: bool) -> dict[str, Any]:
    """Op count of one step, median host time over ``steps``, and (optionally) a cProfile."""
    for _ in range(3):  # warm-up: allocator, kernel selection, optimizer state
        step()
    with OpCounter() as counter:
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "ops_per_step": sum(counter.ops.values()),
        "kernel_ops_per_step": sum(counter.kernels.values()),
        "top_kernel_ops": counter.kernels.most_common(12),
        "cpu_ms_per_step": 1000 * statistics.median(times),
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            step()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        out["profile"] = text.getvalue()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="bf16", choices=["fp32", "bf16", "bf16-pure"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="print ecoadapt's top functions (cProfile)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the host's own cost, not the threads' arithmetic
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = deep_thin_model(Path(tmp) / "model")
        results = {
            "bare": measure(bare_step(model_dir, args.mode), args.steps, False),
            "ecoadapt": measure(ecoadapt_step(model_dir, args.mode, Path(tmp) / "run"), args.steps, args.profile),
        }
    bare, eco = results["bare"], results["ecoadapt"]
    print(f"mode {args.mode}, 30 blocks of width 72, {BATCH} x {SEQ} tokens a step, 1 thread")
    print("| loop | ATen ops per step | of them computing (kernels on a GPU) | CPU ms per step (arithmetic included) |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['ops_per_step']:,} | {r['kernel_ops_per_step']:,} | {r['cpu_ms_per_step']:.0f} |")
    print(f"ecoadapt / bare: ops {eco['ops_per_step'] / bare['ops_per_step']:.2f}x, computing ops "
          f"{eco['kernel_ops_per_step'] / bare['kernel_ops_per_step']:.2f}x, "
          f"CPU time {eco['cpu_ms_per_step'] / bare['cpu_ms_per_step']:.2f}x")  # fmt: skip
    for name, r in results.items():
        print(f"{name} top computing ops: " + ", ".join(f"{k} {v}" for k, v in r["top_kernel_ops"]))
    if args.profile:
        print(eco["profile"])
    if args.json:
        args.json.write_text(
            json.dumps(
                {"mode": args.mode, **{k: {x: v[x] for x in v if x != "profile"} for k, v in results.items()}}, indent=1
            )
        )


if __name__ == "__main__":
    sys.exit(main())
