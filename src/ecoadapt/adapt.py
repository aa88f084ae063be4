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

from ecoadapt import adapters, downstream, layerwise, models, rundir
from ecoadapt import train as train_loop
from ecoadapt.config import RunConfig, dump
from ecoadapt.data import corpus, readers
from ecoadapt.data.batches import BlockLoader, MaskSpec
from ecoadapt.early_stop import EarlyStop, combine
from ecoadapt.errors import UserError
from ecoadapt.evaluate import heldout
from ecoadapt.measure import energy, environment, flops, memory
from ecoadapt.measure.budget import BUDGETS, Budget
from ecoadapt.precision import AUTOCAST_DTYPES, Policy
from ecoadapt.precision import DTYPES as precision_dtypes
from ecoadapt.progress import Progress, say


def measurement_dict(m: energy.Measurement) -> dict[str, Any]:
    """A window's measurement for summary.json."""
    return {"joules": m.joules, "seconds": m.seconds, "method": m.method, "meter": m.meter}


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


def apply_precision(
    model: Any,
    policy: Policy,
    cfg: RunConfig,
    train_blocks: torch.Tensor,
    objective: str,
    mask: MaskSpec | None,
    device: torch.device,
) -> dict[str, Any]:
    """Store and run the model as precision.mode and precision.layers say.

    Returns:
        The per-layer part of the summary: the map applied, the search table for auto, the
        effective dtype of every module, weight bytes, and whether 16-bit is slower here.
    """
    report: dict[str, Any] = {"weight_bytes_before": layerwise.weight_bytes(model)}
    policy.apply(model)
    mapping = cfg.precision.layers
    if mapping == "auto":
        blocks_name, blocks = models.transformer_blocks(model)
        n = cfg.precision.calibration_batches * cfg.train.micro_batch_size
        calibration = train_blocks[:n]

        def calibration_loss() -> float:
            return heldout(model, calibration, objective, mask, cfg.train.micro_batch_size, policy, device)["loss"]

        found = layerwise.search(
            model,
            blocks_name,
            blocks,
            calibration_loss,
            cfg.precision.search_dtype,
            cfg.precision.tolerance,
            device.type,
        )
        say(f"precision search ({found.seconds:.1f} s, calibration loss {found.base_loss:.4f}):")
        for row in found.table:
            say(f"  {row['block']:<28} loss change {row['relative_loss_change']:+.3%}  -> {row['dtype']}")
        say(
            f"  lowered {len(found.chosen)} of {len(blocks)} blocks, predicted loss change "
            f"{found.predicted_change:+.3%} (tolerance {cfg.precision.tolerance:.1%}), "
            f"weights -{found.predicted_weight_saving_bytes / 2**20:.1f} MiB"
        )
        report["search"] = {
            "table": found.table,
            "base_loss": found.base_loss,
            "predicted_change": found.predicted_change,
            "predicted_weight_saving_bytes": found.predicted_weight_saving_bytes,
            "seconds": found.seconds,
        }
        mapping = found.chosen
    if mapping:
        default = None if policy.mode in AUTOCAST_DTYPES else policy.compute_dtype  # no autocast to reconcile
        report["layers"] = layerwise.apply_map(model, mapping, device.type, default)
        if "fp16" in mapping.values():
            policy.use_fp16_layers()
    report["layers_effective"] = layerwise.effective_dtypes(model)
    report["weight_bytes"] = layerwise.weight_bytes(model)
    lowered = [precision_dtypes[v] for v in (mapping or {}).values() if v != "fp32"]
    low = policy.compute_dtype if policy.compute_dtype != torch.float32 else (lowered[0] if lowered else None)
    if low is not None:
        fast, _ = flops.peak_flops(device, low, None)
        full, _ = flops.peak_flops(device, torch.float32, None)
        report["matmul_speedup_vs_fp32"] = fast / full
        if fast < full:
            policy.notes.append(
                f"{str(low).replace('torch.', '')} matmuls run at {fast / 1e9:,.0f} GFLOP/s on this {device.type} "
                f"vs {full / 1e9:,.0f} for fp32: 16-bit is slower here (measured)"
            )
    return report


def _mfu(
    model: Any, loaded: models.LoadedModel, cfg: RunConfig, policy: Policy, device: torch.device, tokens_per_s: float
) -> dict[str, Any]:
    """MFU of the training loop: model FLOPs per token x tokens/s over the device's peak."""
    _, blocks = models.transformer_blocks(model)
    head_fraction = 1.0
    if loaded.objective == "mlm" and train_loop.encoder_and_head(model) is not None:
        head_fraction = cfg.data.mlm_probability  # only masked positions reach the head
    count = flops.training_flops(model, blocks, cfg.data.max_seq_len, loaded.model.config.hidden_size, head_fraction)
    peak, source = flops.peak_flops(device, policy.compute_dtype, cfg.measure.peak_flops)
    return flops.mfu_report(count, tokens_per_s, peak, source)


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
    chosen = energy.choose(
        cfg.measure.energy,
        cfg.measure.cpu_watts_per_core,
        cfg.measure.memory_watts_per_gib,
        gpu_indices=[device.index or 0] if device.type == "cuda" else None,
    )
    for note in chosen.notes:
        say(note)
    tracker = energy.EnergyTracker(chosen.meter)
    if cfg.measure.idle_s > 0:
        say(f"measuring idle power for {cfg.measure.idle_s:g} s ...")
        say(f"idle power: {tracker.measure_idle(cfg.measure.idle_s):.1f} W")

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
    mask = mask_spec(loaded.tokenizer, cfg.data.mlm_probability) if loaded.objective == "mlm" else None
    precision_report = apply_precision(model, policy, cfg, blocks.train, loaded.objective, mask, device)
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
    eval_blocks = blocks.eval[: cfg.data.eval_max_blocks]
    steps = train_loop.total_steps(cfg.train, len(blocks.train))

    run_dir = rundir.create(out, cfg.output.overwrite)
    rundir.atomic_write_text(run_dir / "config.yaml", dump(cfg))
    summary: dict[str, Any] = {"status": "failed", "config": cfg.to_dict()}
    try:

        def evaluate(window: str) -> dict[str, Any]:
            tracker.begin_window(window)
            scores = heldout(model, eval_blocks, loaded.objective, mask, cfg.train.micro_batch_size, policy, device)
            tracker.end_window(window)
            return scores

        before = evaluate("eval")
        say(f"held-out loss before: {before['loss']:.4f}")
        torch.manual_seed(cfg.train.seed)  # dropout masks depend on the seed alone
        memory.reset_cuda_peak(device)
        loader = BlockLoader(blocks.train, cfg.train.micro_batch_size, loaded.objective, mask, cfg.train.seed)
        progress = Progress(steps)
        metrics = run_dir / "metrics.jsonl"
        stopper = EarlyStop(cfg.train.early_stop, cfg.train.early_stop_delta)
        limits = Budget(cfg.budget, tracker, steps, say)
        train_start_j = 0.0

        def on_log(record: train_loop.StepLog) -> None:
            line: dict[str, Any] = dict(record.__dict__)
            if tracker.meter is not None:  # cumulative training energy, where the meter allows
                line["energy_j"] = tracker.total_joules() - train_start_j
                line["energy_method"] = tracker.meter.method
            rundir.append_jsonl(metrics, line)
            progress.update(record.step, record.loss, record.tokens_per_s)

        def periodic_eval(result: train_loop.TrainResult) -> str | None:
            if cfg.train.eval_every is None or result.steps % cfg.train.eval_every:
                return None
            t0 = time.perf_counter()
            scores = evaluate("eval_periodic")
            result.excluded_s += time.perf_counter() - t0  # evaluation is not training time
            rundir.append_jsonl(metrics, {"step": result.steps, "eval_loss": scores["loss"]})
            say(f"[eval] step {result.steps}: held-out loss {scores['loss']:.4f}")
            return "early_stop" if stopper.update(result.steps, scores["loss"]) else None

        should_stop = combine(limits.check if limits.active else None, periodic_eval if cfg.train.eval_every else None)
        train_start_j = tracker.total_joules()
        tracker.begin_window("train")
        result = train_loop.run(model, loader, steps, cfg.train, loaded.objective, policy, device, on_log, should_stop)
        train_window = tracker.end_window("train")
        progress.close()
        # Periodic evaluations ran inside the train window: their energy is not training's.
        periodic = tracker.windows.pop("eval_periodic", None)
        train_joules = train_window.joules - (periodic.joules if periodic else 0.0)
        if periodic:
            tracker.windows["train"] = energy.Measurement(
                train_joules, train_window.seconds - periodic.seconds, train_window.method, train_window.meter
            )
            tracker.windows["eval_periodic"] = periodic
        if result.stopped_by:
            say(f"stopped by {result.stopped_by} after {result.steps} of {steps} steps; evaluating and saving")
        after = evaluate("eval_after")
        say(f"held-out loss after: {after['loss']:.4f} (before {before['loss']:.4f})")
        mem = memory.report(device, rss_before_load)

        t = time.perf_counter()
        tracker.begin_window("save")
        saved = save(model, loaded.tokenizer, run_dir, plan.lora, cfg.lora.merge) if cfg.output.save_model else []
        tracker.end_window("save")
        phases["save_s"] = time.perf_counter() - t
        flop_report = _mfu(model, loaded, cfg, policy, device, result.tokens / max(result.time_s, 1e-9))
        task_summary = None
        if cfg.task.train:
            tracker.begin_window("task")
            task_summary = downstream.compare(cfg, loaded.tokenizer, downstream.backbone_state(model), device)
            task_summary["energy"] = measurement_dict(tracker.end_window("task"))
        energy_summary = tracker.summary(cfg.measure.grid_g_co2_per_kwh)
        if energy_summary is not None:
            energy_summary["train_joules"] = train_joules
            energy_summary["tokens_per_joule"] = result.tokens / train_joules if train_joules > 0 else None
            gain = before["loss"] - after["loss"]
            energy_summary["joules_per_loss_point"] = train_joules / gain if gain > 0 else None
        phases["train_s"] = result.time_s
        phases["eval_s"] = before["time_s"] + after["time_s"]
        summary.update(
            {
                "status": "stopped_by_budget" if result.stopped_by in BUDGETS else "completed",
                "stopped_by": result.stopped_by,
                "budget": limits.summary(result),
                "early_stop": {"history": stopper.history, "best": stopper.best} if stopper.history else None,
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
                "precision": {**policy.summary(), **precision_report},
                "energy": energy_summary,
                "memory": mem,
                "mfu": flop_report["mfu"],
                "flops": flop_report,
                "task": task_summary,
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
