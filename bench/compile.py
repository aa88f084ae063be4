"""Does train.compile pay for itself? Each preset's recipe with compile off, loss and blocks,
compiling counted, in one invocation.

Every run is a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a new
folder): a user's first run, the worst case for compiling. From each run: its seconds per step
without the compile time, and the compile time; the break-even step count is compile seconds /
seconds saved per step, to compare with the preset's own length (train.max_steps).

    python bench/compile.py              # the three presets, 24 steps each (about 12 minutes)

Needs: pip install -e '.[demo,smollm2]'. The presets' corpus ships with Python.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ecoadapt.commands.isolated import run_adapt
from ecoadapt.config.presets import resolve_config

HERE = Path(__file__).resolve().parent
PRESETS = ["quickstart", "minilm-mlm", "smollm2-clm-lora"]
SETTINGS = ["false", "loss", "blocks"]  # train.compile values compared


def measure(preset: str, setting: Any, steps: int, tmp: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(resolve_config(preset).read_text())
    cfg.setdefault("train", {}).update(max_steps=steps, compile=setting, log_every=steps)
    cfg.setdefault("data", {})["eval_max_blocks"] = 4
    cfg["measure"] = {"energy": "auto", "forecast": False}
    cfg["output"] = {"save_model": False}
    name = f"{preset}-{setting}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{name}")  # cold: nothing compiled before
    s = run_adapt(cfg, tmp / name)
    if s.get("status") != "completed":
        return {"error": s.get("error", "failed")}
    compile_s = (s.get("compile") or {}).get("training_compile_s") or 0.0  # training's window only
    return {
        "tokens_per_s": s["tokens_per_s"],
        "time_s": s["time_s"],
        "compile_s": compile_s,
        "step_s_without_compile": (s["time_s"] - compile_s) / s["steps"],
        "train_joules": s["energy"]["train_joules"],
        "eval_loss": s["eval"]["loss"],
    }


def table(results: dict[str, dict[str, dict[str, Any]]], lengths: dict[str, int]) -> str:
    lines = [
        "| preset (its steps) | compile | tokens/s incl. compiling | compile s | s/step after | "
        "break-even steps | wins at the preset's length |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for preset, runs in results.items():
        off = runs["False"]
        for setting, r in runs.items():
            if "error" in r:
                lines.append(f"| {preset} | {setting} | failed: {r['error']} | | | | |")
                continue
            saved = off.get("step_s_without_compile", 0) - r["step_s_without_compile"]
            even = r["compile_s"] / saved if setting != "False" and saved > 0 else None
            wins = "-" if setting == "False" else ("yes" if even is not None and even < lengths[preset] else "no")
            even_text = "-" if setting == "False" else (f"{even:,.0f}" if even is not None else "never (slower)")
            lines.append(
                f"| {preset} ({lengths[preset]}) | {setting} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.1f} | "
                f"{r['step_s_without_compile']:.3f} | {even_text} | {wins} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--presets", nargs="*", default=PRESETS, choices=PRESETS)
    parser.add_argument("--settings", nargs="*", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compile.json")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a saved results file")
    args = parser.parse_args()
    lengths = {p: yaml.safe_load(resolve_config(p).read_text())["train"]["max_steps"] for p in PRESETS}
    if args.table:
        print(table(json.loads(args.table.read_text())["results"], lengths))
        return
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            results[preset] = {}
            for setting in [False if x == "false" else x for x in args.settings]:
                results[preset][str(setting)] = got = measure(preset, setting, args.steps, Path(tmp))
                print(preset, setting, got, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"steps": args.steps, "results": results}, indent=1))
    print(table(results, lengths))


if __name__ == "__main__":
    main()
