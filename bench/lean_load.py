"""Memory of 1-8B decoders on this machine: the lean load against the whole-fp32 load it replaced,
and against the peer a user would write, side by side in one invocation.

For a model folder (``bench/random_llama.py --shape tinyllama --dtype bf16``: TinyLlama-1.1B's
shape in bf16 safetensors shards, random weights) and each recipe, in a fresh process each:

- ``ecoadapt``: ``ecoadapt adapt`` of this checkout;
- ``before`` (``--before REV``): the same command from a git worktree of REV (the fp32 load);
- ``peer``: transformers' own loading (``BitsAndBytesConfig`` for QLoRA) + PEFT + a plain
  PyTorch loop, the same recipe, the same steps of random tokens.

Figures: the process tree's resident peak (sampled every 20 ms: parent and children summed),
the run's own load and training peaks (its summary.json; resident peak on a CPU), and seconds
per step. Every recipe is 2 steps (``--steps``) of one 128-token block with gradient
checkpointing, LoRA r=8 on the attention and MLP projections. With ``--rounds N`` each side runs
N times, in alternating order, and keeps its fastest round (the machine is shared: compare
sides within one invocation). Energy is not the point here (and is estimated on this machine).

    python bench/lean_load.py --model /tmp/models/tinyllama [--before HEAD~1] [--peer]
        [--recipes "qlora nf4" "bf16-pure lora"] [--steps 8 --rounds 2]
        [--json bench/results/lean_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES: dict[str, dict[str, Any]] = {
    "bf16 lora": {"precision": {"mode": "bf16"}, "lora": LORA},
    "bf16-pure lora": {"precision": {"mode": "bf16-pure"}, "lora": LORA},
    "qlora nf4": {"precision": {"mode": "bf16"}, "lora": {**LORA, "quantize": "nf4"}},
    # On CPUs whose bf16 matmuls are slower than fp32's (this one's: 11 against 62 GFLOP/s), the
    # 4-bit base computing in fp32: the embeddings and head then stay in fp32 too.
    "qlora nf4 fp32": {"precision": {"mode": "fp32"}, "lora": {**LORA, "quantize": "nf4"}},
    "qlora int8": {"precision": {"mode": "bf16"}, "lora": {**LORA, "quantize": "int8"}},
    "bf16-pure full": {"precision": {"mode": "bf16-pure"}},
    "fp32 full": {"precision": {"mode": "fp32"}},
}
STEPS, SEQ = 2, 128


def config(model: str, recipe: str, steps: int = STEPS) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"name_or_path": model, "objective": "clm"},
        "data": {"train": ["builtin:python-docstrings"], "max_seq_len": SEQ, "eval_max_blocks": 1},
        "train": {
            "max_steps": steps, "micro_batch_size": 1, "lr": 1e-4, "log_every": 1, "compile": False,
            "gradient_checkpointing": True,
        },
        "measure": {"forecast": False},
        "output": {"save_model": False},
    }  # fmt: skip
    for section, values in RECIPES[recipe].items():
        cfg.setdefault(section, {}).update(values)
    if "lora" in cfg:
        cfg["lora"] = {**cfg["lora"], "target_modules": TARGETS}
    return cfg


def tree_peak(command: list[str], env: dict[str, str], log: Path) -> tuple[int, int, dict[str, Any]]:
    """Run ``command``; (its exit status, the peak of its process tree's summed resident set,
    what made that peak: seconds since the start and each process's command and resident bytes,
    so that a child forked from a loaded parent, whose shared pages a sum counts twice, is seen)."""
    peak = 0
    at: dict[str, Any] = {}
    with log.open("w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(child.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, at
            while not done.is_set():
                try:
                    procs = [root, *root.children(recursive=True)]
                    sizes = [(p, p.memory_info().rss) for p in procs]
                    total = sum(rss for _, rss in sizes)
                    if total > peak:
                        peak = total
                        parts = [{"pid": p.pid, "command": " ".join(p.cmdline())[:120], "rss": rss} for p, rss in sizes]
                        at = {"s": round(time.perf_counter() - start, 2), "processes": parts}
                except psutil.Error:
                    pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        status = child.wait()
        done.set()
        sampler.join()
    return status, peak, at


def run_ecoadapt(model: str, recipe: str, work: Path, src: Path | None, steps: int = STEPS) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    cfg = config(model, recipe, steps)
    cfg["output"]["dir"] = str(work / "run")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    status, peak, at = tree_peak([sys.executable, "-m", "ecoadapt", "adapt", str(path)], env, work / "log.txt")
    summary_path = work / "run" / "summary.json"
    if status != 0 or not summary_path.exists():
        tail = (work / "log.txt").read_text().strip().splitlines()[-1:]
        return {"error": f"exit {status}: {tail[0] if tail else ''}"[:300], "tree_peak_bytes": peak}
    s = json.loads(summary_path.read_text())
    mem = s.get("memory") or {}
    return {
        "tree_peak_bytes": peak,
        "tree_peak_at": at,
        "load_peak_bytes": mem.get("load_peak_bytes"),
        "train_peak_bytes": mem.get("train_peak_bytes"),
        "train_peak_above_baseline_bytes": mem.get("train_peak_above_baseline_bytes"),
        "step_s": s["time_s"] / max(1, s["steps"]),
        "load": (s.get("precision") or {}).get("load"),
    }


def peer_child(model: str, recipe: str, out: Path, steps: int = STEPS) -> None:
    """The peer, in this (child) process: transformers' loading + PEFT + a plain loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    spec = RECIPES[recipe]
    mode = spec["precision"]["mode"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lora = spec.get("lora")
    kwargs: dict[str, Any] = {"dtype": torch.float32 if mode == "fp32" else torch.bfloat16}
    kind = (lora or {}).get("quantize")
    if kind:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=kind == "nf4", load_in_8bit=kind == "int8", bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=kwargs["dtype"],
        )  # fmt: skip
    kwargs["device_map"] = {"": device}
    if mode == "bf16" and not lora:
        kwargs["dtype"] = torch.float32  # autocast trains fp32 weights
    t0 = time.perf_counter()
    folder, gguf_file = peer_source(model)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file  # transformers dequantizes the GGUF file into kwargs["dtype"]
    model_ = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    load_s = time.perf_counter() - t0
    model_.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model_.config.use_cache = False
    if lora:
        model_ = get_peft_model(model_, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    # from_pretrained returns the model in eval mode, where transformers skips checkpointing (and
    # bitsandbytes' int8 layers take their inference path): a loop must say it trains.
    model_.train()
    params = [p for p in model_.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model_.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = model_(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    cuda_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    out.write_text(json.dumps({"step_s": sum(times) / len(times), "load_s": load_s, "train_peak_bytes": cuda_peak}))


def peer_source(model: str) -> tuple[str, str | None]:
    """Where transformers reads ``model`` from: a folder, or a GGUF file's folder and name (a
    ``pkg:`` model is found where ecoadapt finds it; the peer then loads it as a user would)."""
    if model.startswith("pkg:") or model.endswith(".gguf"):
        from ecoadapt.model.pretrained import resolve

        folder, gguf_file, _ = resolve(model)
        return folder, gguf_file
    return model, None


def run_peer(model: str, recipe: str, work: Path, steps: int = STEPS) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "peer.json"
    command = [sys.executable, __file__, "--peer-child", recipe, "--model", model, "--json", str(out)]
    command += ["--steps", str(steps)]
    status, peak, at = tree_peak(command, dict(os.environ), work / "log.txt")
    if status != 0 or not out.exists():
        tail = (work / "log.txt").read_text().strip().splitlines()[-1:]
        return {"error": f"exit {status}: {tail[0] if tail else ''}"[:300], "tree_peak_bytes": peak}
    return {"tree_peak_bytes": peak, "tree_peak_at": at, **json.loads(out.read_text())}


def planned(model: str, recipe: str) -> dict[str, Any]:
    """What ``ecoadapt plan --device cpu-24gb`` projects for the recipe from the model's shapes
    alone (a fresh process, on a copy of the model's config.json and tokenizer without its
    weights, as for a model this machine cannot load): the peak it projects (static bytes, one
    row of activations, and its own process with the model's code and tokenizer loaded), to
    hold against the run's measured process-tree peak."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = config_only(model, Path(tmp) / "config-only")
        cfg = config(str(folder), recipe)
        path = Path(tmp) / "plan.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = Path(tmp) / "plan.json"
        command = [sys.executable, "-m", "ecoadapt", "plan", str(path), "--device", "cpu-24gb", "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return {"planned_error": (done.stderr.strip().splitlines() or [""])[-1][:300]}
        (row,) = json.loads(out.read_text())["recipes"]
    return {"planned_bytes": int(row["peak_bytes"]), "planned_parts_bytes": row["parts_bytes"]}


def config_only(model: str, folder: Path) -> Path:
    """``model``'s config.json and tokenizer in ``folder``, without weights (a GGUF or ``pkg:``
    model's from its file's metadata)."""
    from ecoadapt.config import from_dict
    from ecoadapt.forecast import from_shapes
    from ecoadapt.model import pretrained

    cfg = from_dict(config(model, "bf16 lora"))
    from_shapes.model_config(cfg).save_pretrained(folder)
    pretrained.load_tokenizer(cfg.model).save_pretrained(folder)
    return folder


def worktree(rev: str, where: Path) -> Path:
    """A checkout of ``rev`` (its src/ goes first on PYTHONPATH)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], check=True, capture_output=True)
    return where / "src"


def gib(n: int | None) -> str:
    return f"{n / 2**30:5.2f}" if n else "    -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (bench/random_llama.py), or pkg:gemma3-270m")
    parser.add_argument("--recipes", nargs="*", default=["bf16 lora", "bf16-pure lora", "qlora nf4", "qlora int8"])
    parser.add_argument("--before", help="also run each recipe with the ecoadapt of this git revision")
    parser.add_argument("--peer", action="store_true", help="also run transformers + PEFT + a plain loop")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--planned", action="store_true", help="only what plan counts from the shapes, per recipe")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating their order")
    parser.add_argument("--peer-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_child:
        peer_child(args.model, args.peer_child, args.json, args.steps)
        return
    if args.planned:
        for recipe in args.recipes:
            print(f"{recipe:<16} planned {gib(planned(args.model, recipe).get('planned_bytes'))} GiB", flush=True)
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old_src = worktree(args.before, Path(tmp) / "before") if args.before else None
        try:
            for i, recipe in enumerate(args.recipes):
                row = one_recipe(args, recipe, Path(tmp) / str(i), old_src)
                results[recipe] = row
                cells = "  ".join(
                    f"{who}: " + (r["error"] if "error" in r else f"tree {gib(r['tree_peak_bytes'])} GiB, "
                                  f"load {gib(r.get('load_peak_bytes'))}, train {gib(r.get('train_peak_bytes'))}, "
                                  f"{r['step_s']:.2f} s/step")
                    for who, r in row.items()
                )  # fmt: skip
                print(f"{recipe:<16} {cells}", flush=True)
        finally:
            if old_src is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(old_src.parent)], capture_output=True)
    if args.json:
        meta = {
            "model": args.model, "steps": args.steps, "seq": SEQ, "rounds": args.rounds, "before": args.before,
            "cpu": _cpu(), "step_s": "the fastest round's (training loop wall time / steps)",
        }  # fmt: skip
        args.json.write_text(json.dumps({"setup": meta, "results": results}, indent=1))


def one_recipe(args: argparse.Namespace, recipe: str, work: Path, old_src: Path | None) -> dict[str, Any]:
    """Each side of ``recipe`` (this checkout, ``--before``, ``--peer``) ``--rounds`` times, the
    order reversed every other round so that neither side always runs on the warmer machine; a
    side's figures are from its fastest round, with every round's seconds per step beside them."""
    sides: list[tuple[str, Any]] = [("ecoadapt", None)]
    sides += [("before", old_src)] if old_src is not None else []
    sides += [("peer", "peer")] if args.peer else []
    rounds: dict[str, list[dict[str, Any]]] = {who: [] for who, _ in sides}
    for n in range(args.rounds):
        for who, src in sides if n % 2 == 0 else sides[::-1]:
            where = work / f"{who}-{n}"
            if who == "peer":
                rounds[who].append(run_peer(args.model, recipe, where, args.steps))
            else:
                rounds[who].append(run_ecoadapt(args.model, recipe, where, src, args.steps))
                if who == "ecoadapt":
                    rounds[who][-1].update(planned(args.model, recipe))
    row = {}
    for who, done in rounds.items():
        ok = [r for r in done if "error" not in r]
        best = min(ok, key=lambda r: r["step_s"]) if ok else done[0]
        row[who] = {**best, "step_s_rounds": [r.get("step_s") for r in done]}
    return row


def _cpu() -> str:
    from ecoadapt.measure.environment import cpu_name

    return cpu_name()


if __name__ == "__main__":
    main()
