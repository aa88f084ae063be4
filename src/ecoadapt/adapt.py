"""`ecoadapt adapt`: continued pre-training from config to run directory.

Every check that can fail on bad input runs before the run directory is created; from then on a
failure still writes ``summary.json`` with ``status: failed`` and the error.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ecoadapt import adapters, models, rundir
from ecoadapt import train as train_loop
from ecoadapt.config import RunConfig, dump
from ecoadapt.data import corpus, readers
from ecoadapt.data.batches import BlockLoader, MaskSpec
from ecoadapt.errors import UserError
from ecoadapt.evaluate import heldout
from ecoadapt.measure import energy, environment, memory
from ecoadapt.measure.budget import Budget
from ecoadapt.precision import Policy
from ecoadapt.progress import Progress, say


def pick_device(choice: str) -> torch.device:
    """The training device: ``auto`` takes the GPU when one is visible."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is visible; use auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def mask_spec(tokenizer: Any, probability: float) -> MaskSpec:
    """What masking needs from an MLM tokenizer."""
    return MaskSpec(
        mask_id=int(tokenizer.mask_token_id),
        vocab_size=len(tokenizer),
        special_ids=sorted(set(tokenizer.all_special_ids)),
        probability=probability,
    )


def save(model: Any, tokenizer: Any, run_dir: Path, lora: bool, merge: bool) -> list[str]:
    """Save the adapter (PEFT format) and/or the full model, each through a temp folder.

    Returns:
        The names of the folders written (``adapter``, ``model``).
    """
    written = []
    targets: list[tuple[str, Any]] = []
    if lora:
        targets.append(("adapter", model))
        if merge:
            targets.append(("model", None))
    else:
        targets.append(("model", model))
    for name, obj in targets:
        tmp = run_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if obj is None:  # merged copy: fold the adapter into the base weights
            obj = model.merge_and_unload()
        obj.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, run_dir / name)
        written.append(name)
    return written


def run(cfg: RunConfig, base: Path | None = None) -> dict[str, Any]:
    """Run continued pre-training as ``cfg`` says and return the summary (also in summary.json).

    Args:
        cfg: the checked configuration.
        base: the config file's folder (relative corpus paths are looked up there first).

    Raises:
        UserError: bad input found before the run directory is created.
    """
    out = Path(cfg.output.dir)
    # Cheap checks first: a typo in a path fails in milliseconds, not after loading a model.
    rundir.check_writable(out, cfg.output.overwrite)
    readers.resolve(cfg.data.train, base)
    models.resolve(cfg.model.name_or_path)
    device = pick_device(cfg.train.device)
    phases: dict[str, float] = {}
    chosen = energy.choose(cfg.measure.energy, cfg.measure.cpu_watts_per_core, cfg.measure.memory_watts_per_gib)
    for note in chosen.notes:
        say(note)
    tracker = energy.EnergyTracker(chosen.meter)

    rss_before_load = memory.rss_bytes()
    t = time.perf_counter()
    say(f"loading {cfg.model.name_or_path} ...")
    tracker.begin_window("load")
    loaded = models.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)
    phases["load_s"] = time.perf_counter() - t
    if loaded.fresh:
        say(f"newly initialised (trained from scratch): {', '.join(loaded.fresh)}")

    t = time.perf_counter()
    blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective, base)
    phases["tokenize_s"] = time.perf_counter() - t
    tracker.end_window("load")  # loading the model and tokenizing the corpus
    stats = blocks.stats
    say(
        f"corpus: {stats['train_documents']} train / {stats['eval_documents']} held-out documents, "
        f"{stats['train_blocks']} blocks of {cfg.data.max_seq_len} tokens (cache {stats['cache']})"
    )
    if len(blocks.train) < cfg.train.micro_batch_size:
        say(f"note: only {len(blocks.train)} training blocks; micro-batches repeat blocks within an epoch")

    model, plan = adapters.prepare(loaded, cfg.train, cfg.lora)
    model.to(device)
    policy = Policy(cfg.precision.mode, device.type)
    for note in policy.notes:
        say(f"note: {note}")
    counts = models.parameter_counts(model)
    say(
        f"{loaded.objective.upper()} on {device.type}, {cfg.precision.mode}: "
        f"{counts['trainable']:,} of {counts['total']:,} parameters train"
        + (f" (LoRA r={cfg.lora.r})" if plan.lora else "")
        + (
            f", blocks {plan.blocks[0]}-{plan.blocks[-1]} of {plan.n_blocks}"
            if len(plan.blocks) < plan.n_blocks
            else ""
        )
    )
    mask = mask_spec(loaded.tokenizer, cfg.data.mlm_probability) if loaded.objective == "mlm" else None
    eval_blocks = blocks.eval[: cfg.data.eval_max_blocks]
    steps = train_loop.total_steps(cfg.train, len(blocks.train))

    run_dir = rundir.create(out, cfg.output.overwrite)
    rundir.atomic_write_text(run_dir / "config.yaml", dump(cfg))
    summary: dict[str, Any] = {"status": "failed", "config": cfg.to_dict()}
    try:
        tracker.begin_window("eval")
        before = heldout(model, eval_blocks, loaded.objective, mask, cfg.train.micro_batch_size, policy, device)
        tracker.end_window("eval")
        say(f"held-out loss before: {before['loss']:.4f}")
        torch.manual_seed(cfg.train.seed)  # dropout masks depend on the seed alone
        memory.reset_cuda_peak(device)
        loader = BlockLoader(blocks.train, cfg.train.micro_batch_size, loaded.objective, mask, cfg.train.seed)
        progress = Progress(steps)
        metrics = run_dir / "metrics.jsonl"

        def on_log(record: train_loop.StepLog) -> None:
            rundir.append_jsonl(metrics, record.__dict__)
            progress.update(record.step, record.loss, record.tokens_per_s)

        tracker.begin_window("train")
        limits = Budget(cfg.budget, tracker, steps, say)
        result = train_loop.run(
            model,
            loader,
            steps,
            cfg.train,
            loaded.objective,
            policy,
            device,
            on_log,
            limits.check if limits.active else None,
        )
        train_energy = tracker.end_window("train")
        progress.close()
        if result.stopped_by:
            say(f"stopped by budget.{result.stopped_by} after {result.steps} of {steps} steps; evaluating and saving")
        tracker.begin_window("eval_after")
        after = heldout(model, eval_blocks, loaded.objective, mask, cfg.train.micro_batch_size, policy, device)
        tracker.end_window("eval_after")
        say(f"held-out loss after: {after['loss']:.4f} (before {before['loss']:.4f})")
        mem = memory.report(device, rss_before_load)

        t = time.perf_counter()
        tracker.begin_window("save")
        saved = save(model, loaded.tokenizer, run_dir, plan.lora, cfg.lora.merge) if cfg.output.save_model else []
        tracker.end_window("save")
        phases["save_s"] = time.perf_counter() - t
        energy_summary = tracker.summary()
        if energy_summary is not None:
            energy_summary["train_joules"] = train_energy.joules
            energy_summary["tokens_per_joule"] = result.tokens / train_energy.joules if train_energy.joules else None
            gain = before["loss"] - after["loss"]
            energy_summary["joules_per_loss_point"] = train_energy.joules / gain if gain > 0 else None
        phases["train_s"] = result.time_s
        phases["eval_s"] = before["time_s"] + after["time_s"]
        summary.update(
            {
                "status": "stopped_by_budget" if result.stopped_by else "completed",
                "budget": limits.summary(result),
                "objective": loaded.objective,
                "model": {
                    "source": loaded.source,
                    "parameters": counts,
                    "trainable_blocks": plan.blocks,
                    "n_blocks": plan.n_blocks,
                    "lora": plan.lora,
                    "newly_initialised": loaded.fresh,
                    "saved": saved,
                },
                "data": stats,
                "steps": result.steps,
                "epochs": loader.epochs_done,
                "tokens": result.tokens,
                "target_tokens": result.target_tokens,
                "time_s": result.time_s,
                "tokens_per_s": result.tokens / max(result.time_s, 1e-9),
                "train_loss": result.train_loss,
                "eval": {
                    "loss_before": before["loss"],
                    "loss": after["loss"],
                    "perplexity_before": before["perplexity"],
                    "perplexity": after["perplexity"],
                    "accuracy_before": before["accuracy"],
                    "accuracy": after["accuracy"],
                    "target_tokens": after["target_tokens"],
                    "blocks": len(eval_blocks),
                },
                "precision": policy.summary(),
                "energy": energy_summary,
                "memory": mem,
                "mfu": None,
                "task": None,
                "phases_s": phases,
                "environment": environment.describe(device),
            }
        )
    except BaseException as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        summary["environment"] = environment.describe(device)
        rundir.write_json(run_dir / "summary.json", summary)
        raise
    rundir.write_json(run_dir / "summary.json", summary)
    return summary
