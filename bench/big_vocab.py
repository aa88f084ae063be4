"""What chunked logits save where the vocabulary sets the cost: Gemma 3 270M (262,144 words).

One training step (forward and backward) of bf16 LoRA (autocast, r=8 on the attention and MLP
projections) on ROWS x SEQ random tokens, two ways, each in a fresh process:

- ``chunked``: ecoadapt's loss (:class:`ecoadapt.model.losses.LossModule`): the vocabulary
  projection and its loss a chunk of rows at a time, no whole logits;
- ``full``: the model's own forward with ``labels`` (transformers' loss over whole logits), what
  a plain loop or the Trainer does.

Figure: the resident set's peak during the step above the resident set just before it (the
kernel's high-water mark, reset before the step; the weights and the LoRA model are already
there), and the step's seconds. Energy is not the point here. Raw: ``bench/results/big_vocab.json``.

    python bench/big_vocab.py [--model pkg:gemma3-270m] [--rows 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(model_name: str, mode: str, rows: int, seq: int) -> dict[str, Any]:
    """One step in this process; what it cost above the loaded model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ecoadapt.config import ModelConfig
    from ecoadapt.core import heap
    from ecoadapt.measure import memory
    from ecoadapt.model import pretrained
    from ecoadapt.model.load_spec import Recipe
    from ecoadapt.model.losses import LossModule

    torch.manual_seed(0)
    loaded = pretrained.load(ModelConfig(name_or_path=model_name, objective="clm"), seq, recipe=Recipe("bf16", True))
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (rows, seq))
    loss_module = LossModule(model, "clm")

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if mode == "chunked":
                loss = loss_module(input_ids=ids, labels=ids)
            else:
                loss = model(input_ids=ids, labels=ids).loss * (rows * (seq - 1))  # the same sum
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # the first step allocates the LoRA gradients and warms the kernels
    heap.release_freed()
    if not memory.reset_rss_peak():
        raise SystemExit("needs Linux's /proc/self/clear_refs to reset the resident peak before the step")
    before = memory.rss_bytes()
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    peak = memory.peak_rss_bytes()
    return {"vocab": vocab, "above_before_bytes": peak - before, "step_s": seconds, "loss_sum": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg:gemma3-270m")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "big_vocab.json")
    parser.add_argument("--child", choices=["chunked", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.rows, args.seq)))
        return
    results: dict[str, Any] = {}
    for mode in ("chunked", "full"):
        command = [sys.executable, __file__, "--child", mode, "--model", args.model]
        command += ["--rows", str(args.rows), "--seq", str(args.seq)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:8} {r['above_before_bytes'] / 2**20:8.0f} MiB above the loaded model, {r['step_s']:.1f} s/step")
    saved = 1 - results["chunked"]["above_before_bytes"] / results["full"]["above_before_bytes"]
    print(f"chunked logits: {saved:.0%} less memory for the step; losses {results['chunked']['loss_sum']:.1f} "
          f"and {results['full']['loss_sum']:.1f} (the same sum)")  # fmt: skip
    setup = {"model": args.model, "rows": args.rows, "seq": args.seq, "recipe": "bf16 LoRA r=8 (autocast)"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
