"""`ecoadapt adapt`: continued pre-training from config to run directory.

Every check that can fail on bad input runs before the run directory is created; from then on a
failure still writes ``summary.json`` with ``status: failed`` and the error. Under data
parallelism every rank runs this same code on its shard; rank 0 alone prints and writes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ecoadapt import adapters, checkpoint, downstream, layerwise, models, parallel, rundir
from ecoadapt import train as train_loop
from ecoadapt.config import RunConfig, dump
from ecoadapt.data import corpus, readers
from ecoadapt.data.batches import BlockLoader, MaskSpec
from ecoadapt.early_stop import EarlyStop, combine
from ecoadapt.errors import UserError
from ecoadapt.evaluate import heldout
from ecoadapt.interrupt import Interrupts
from ecoadapt.measure import energy, environment, flops, memory
from ecoadapt.measure.budget import BUDGETS, Budget
from ecoadapt.precision import AUTOCAST_DTYPES, Policy
from ecoadapt.precision import DTYPES as precision_dtypes
from ecoadapt.progress import Progress, say


def measurement_dict(m: energy.Measurement) -> dict[str, Any]:
    """A window's measurement for summary.json."""
    return {"joules": m.joules, "seconds": m.seconds, "method": m.method, "meter": m.meter}


def mask_spec(tokenizer: Any, probability: float) -> MaskSpec:
    """What masking needs from an MLM tokenizer."""
    return MaskSpec(
        mask_id=int(tokenizer.mask_token_id),
        vocab_size=len(tokenizer),
        special_ids=sorted(set(tokenizer.all_special_ids)),
        probability=probability,
    )


def save(
    model: Any, tokenizer: Any, run_dir: Path, lora: bool, merge: bool, state_dict: dict[str, Any] | None = None
) -> list[str]:
    """Save the adapter (PEFT format) and/or the full model, each through a temp folder.

    Args:
        state_dict: the full weights when they had to be gathered (FSDP); else the model's own.

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
        obj.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
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
    if mapping is None and cfg.lora.enabled and not cfg.lora.merge and cfg.parallel.strategy != "fsdp":
        # LoRA's frozen base Linears in the autocast dtype: the same numbers, no cast per step.
        # Not with layer maps (which set dtypes themselves), nor when a merged model is saved
        # (its base weights must stay as loaded), nor under FSDP: a shard unit mixing bf16 and
        # fp32 parameters made the 2-process CPU test abort at exit about one run in two.
        report["frozen_linear_bytes_saved"] = policy.store_frozen_linears(model)
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
            default=None if policy.mode in AUTOCAST_DTYPES else policy.compute_dtype,  # no autocast to reconcile
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
        default = None if policy.mode in AUTOCAST_DTYPES else policy.compute_dtype
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
    model: Any,
    loaded: models.LoadedModel,
    cfg: RunConfig,
    policy: Policy,
    device: torch.device,
    tokens_per_s: float,
    precision_layers: dict[str, str],
) -> dict[str, Any]:
    """MFU of the training loop: model FLOPs per token x tokens/s over the device's peak."""
    _, blocks = models.transformer_blocks(model)
    head_fraction = 1.0
    if loaded.objective == "mlm" and train_loop.encoder_and_head(model) is not None:
        head_fraction = cfg.data.mlm_probability  # only masked positions reach the head
    count = flops.training_flops(model, blocks, cfg.data.max_seq_len, loaded.model.config.hidden_size, head_fraction)
    # The peak of the dtype the blocks (nearly all FLOPs) compute in: a layer map can lower them.
    lowered = {v for v in precision_layers.values() if v != "fp32"}
    dtype = precision_dtypes[lowered.pop()] if len(lowered) == 1 else policy.compute_dtype
    peak, source = flops.peak_flops(device, dtype, cfg.measure.peak_flops)
    return flops.mfu_report(count, tokens_per_s, peak, source)


@dataclass
class Prepared:
    """Everything a run sets up before its run directory exists."""

    loaded: models.LoadedModel
    blocks: corpus.TokenBlocks
    model: Any
    plan: adapters.TrainablePlan
    policy: Policy
    mask: MaskSpec | None
    precision_report: dict[str, Any]
    counts: dict[str, int]
    rss_before_load: int
    phases: dict[str, float] = field(default_factory=dict)


def energy_tracker(
    cfg: RunConfig, world: parallel.World, device: torch.device, log: Callable[[str], None]
) -> energy.EnergyTracker:
    """The run's energy windows over the meter measure.energy names (notes go to ``log``)."""
    chosen = energy.choose(
        cfg.measure.energy,
        cfg.measure.cpu_watts_per_core,
        cfg.measure.memory_watts_per_gib,
        gpu_indices=[device.index or 0] if device.type == "cuda" else None,
    )
    for note in chosen.notes:
        log(note)
    meter = chosen.meter
    if isinstance(meter, energy.RaplMeter) and world.local_rank != 0:
        meter = None  # one CPU package, one meter: local rank 0 counts it for the machine
    return energy.EnergyTracker(meter)


def prepare(
    cfg: RunConfig,
    base: Path | None,
    device: torch.device,
    world: parallel.World,
    tracker: Any,
    log: Callable[[str], None],
) -> Prepared:
    """Load the model, tokenize the corpus, choose what trains and in which precision, wrap."""
    rss_before_load = memory.rss_bytes()
    phases: dict[str, float] = {}
    t = time.perf_counter()
    log(f"loading {cfg.model.name_or_path} ...")
    tracker.begin_window("load")
    loaded = models.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)
    phases["load_s"] = time.perf_counter() - t
    if loaded.fresh:
        log(f"newly initialised (trained from scratch): {', '.join(loaded.fresh)}")
    t = time.perf_counter()
    blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective, base)
    phases["tokenize_s"] = time.perf_counter() - t
    tracker.end_window("load")  # loading the model and tokenizing the corpus
    stats = blocks.stats
    log(
        f"corpus: {stats['train_documents']} train / {stats['eval_documents']} held-out documents, "
        f"{stats['train_blocks']} blocks of {cfg.data.max_seq_len} tokens (cache {stats['cache']})"
    )
    if len(blocks.train) < cfg.train.micro_batch_size * world.size:
        log(f"note: only {len(blocks.train)} training blocks; micro-batches repeat blocks within an epoch")

    model, plan = adapters.prepare(loaded, cfg.train, cfg.lora)
    model.to(device)
    policy = Policy(cfg.precision.mode, device.type)
    mask = mask_spec(loaded.tokenizer, cfg.data.mlm_probability) if loaded.objective == "mlm" else None
    precision_report = apply_precision(model, policy, cfg, blocks.train, loaded.objective, mask, device)
    for note in policy.notes:
        log(f"note: {note}")
    counts = models.parameter_counts(model)
    _, block_list = models.transformer_blocks(model)
    model = parallel.wrap(model, world, device, block_list)
    log(
        f"{loaded.objective.upper()} on {device.type}, {cfg.precision.mode}: "
        f"{counts['trainable']:,} of {counts['total']:,} parameters train"
        + (f" (LoRA r={cfg.lora.r})" if plan.lora else "")
        + (
            f", blocks {plan.blocks[0]}-{plan.blocks[-1]} of {plan.n_blocks}"
            if len(plan.blocks) < plan.n_blocks
            else ""
        )
        + (f", {world.strategy.upper()} over {world.size} processes" if world.distributed else "")
    )
    return Prepared(loaded, blocks, model, plan, policy, mask, precision_report, counts, rss_before_load, phases)


def _combined_energy(tracker: Any, cfg: RunConfig, world: parallel.World) -> dict[str, Any] | None:
    """This rank's energy summary, or under data parallelism the sum over ranks (rank 0)."""
    mine = tracker.summary(cfg.measure.grid_g_co2_per_kwh)
    every = parallel.gather(mine, world)
    if not world.distributed:
        return mine
    metered = [e for e in every if e is not None]
    if not metered:
        return None
    total = dict(metered[0])
    total["joules"] = sum(e["joules"] for e in metered)
    total["phases"] = {
        name: {k: sum(e["phases"].get(name, {}).get(k, 0.0) for e in metered) for k in ("joules", "seconds")}
        for name in metered[0]["phases"]
    }
    total["per_rank_joules"] = [e["joules"] if e else None for e in every]
    total["ranks_metered"] = len(metered)
    return total


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
    resume = rundir.resume_point(out, cfg.to_dict(), cfg.output.overwrite, cfg.output.resume, checkpoint.FILENAME)
    readers.resolve(cfg.data.train, base)
    models.resolve(cfg.model.name_or_path)
    world, device = parallel.setup(cfg.parallel.strategy, cfg.train.device, cfg.parallel.timeout_s)
    if world.strategy == "fsdp" and cfg.lora.merge:
        raise UserError("lora.merge is not available with parallel.strategy = fsdp; merge the saved adapter afterwards")
    try:
        return _run(cfg, base, out, world, device, resume)
    finally:
        parallel.teardown(barrier=False)  # after an error a peer may never reach a barrier


def _run(
    cfg: RunConfig,
    base: Path | None,
    out: Path,
    world: parallel.World,
    device: torch.device,
    resume: rundir.ResumePoint,
) -> dict[str, Any]:
    def log(message: str) -> None:
        if world.is_main:
            say(message)

    resumed = checkpoint.load(resume.checkpoint) if resume.checkpoint is not None else None
    tracker = energy_tracker(cfg, world, device, log)
    if cfg.measure.idle_s > 0:
        log(f"measuring idle power for {cfg.measure.idle_s:g} s ...")
        watts = tracker.measure_idle(cfg.measure.idle_s)
        log(f"idle power: {watts:.1f} W")
    p = prepare(cfg, base, device, world, tracker, log)
    loaded, model, policy = p.loaded, p.model, p.policy
    eval_blocks = p.blocks.eval[: cfg.data.eval_max_blocks]
    steps = train_loop.total_steps(cfg.train, len(p.blocks.train) // world.size)

    if world.is_main:
        _check_room(cfg, out, p)
    if resumed is not None:
        run_dir = out
        resumed_at = int(resumed["loop"]["steps"])
        log(f"resuming from the checkpoint at step {resumed_at} of {steps}")
        if world.is_main:
            rundir.truncate_jsonl(run_dir / "metrics.jsonl", resumed_at)
            (run_dir / "summary.json").unlink(missing_ok=True)  # the interrupted one: no longer true
        tracker.carry({k: (float(v[0]), float(v[1])) for k, v in resumed["extra"]["energy_windows"].items()})
    else:
        run_dir = rundir.create(out, cfg.output.overwrite or resume.restart) if world.is_main else out
        if world.is_main:
            rundir.atomic_write_text(run_dir / "config.yaml", dump(cfg))
    summary: dict[str, Any] = {"status": "failed", "config": cfg.to_dict()}
    try:

        def evaluate(window: str) -> dict[str, Any]:
            # Every rank evaluates every held-out block: no communication, and the numbers are
            # those a single process gets (FSDP needs all ranks in each forward pass anyway).
            tracker.begin_window(window)
            scores = heldout(model, eval_blocks, loaded.objective, p.mask, cfg.train.micro_batch_size, policy, device)
            tracker.end_window(window)
            return scores

        before = resumed["extra"]["before"] if resumed is not None else evaluate("eval")
        log(f"held-out loss before: {before['loss']:.4f}")
        torch.manual_seed(cfg.train.seed)  # dropout masks depend on the seed alone
        memory.reset_cuda_peak(device)
        loader = BlockLoader(
            p.blocks.train, cfg.train.micro_batch_size, loaded.objective, p.mask, cfg.train.seed, world.rank, world.size
        )
        progress = Progress(steps) if world.is_main else None
        metrics = run_dir / "metrics.jsonl"
        stopper = EarlyStop(cfg.train.early_stop, cfg.train.early_stop_delta)
        loop = train_loop.Loop.create(model, steps, cfg.train, policy)
        checkpoints = None
        if world.strategy != "fsdp":  # FSDP shards would need a distributed checkpoint format
            checkpoints = checkpoint.RunCheckpoints(
                run_dir / checkpoint.FILENAME,
                loader,
                world.is_main,
                lambda: {
                    "before": before,
                    "energy_windows": tracker.snapshot(),
                    "early_stop": [stopper.history, stopper.best, stopper.stale],
                },
            )
        if resumed is not None:
            assert checkpoints is not None
            checkpoints.resume(loop, resumed)
            history, stopper.best, stopper.stale = resumed["extra"]["early_stop"]
            stopper.history = [tuple(h) for h in history]
        limits = Budget(cfg.budget, tracker, steps, log)
        prior_train = tracker.windows.pop("train", None)  # resumed: the runs before this one
        limits.joules_at_start -= prior_train.joules if prior_train is not None else 0.0
        train_start_j = 0.0

        def on_log(record: train_loop.StepLog) -> None:
            if progress is None:
                return
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
            if world.is_main:
                rundir.append_jsonl(metrics, {"step": result.steps, "eval_loss": scores["loss"]})
            log(f"[eval] step {result.steps}: held-out loss {scores['loss']:.4f}")
            return "early_stop" if stopper.update(result.steps, scores["loss"]) else None

        with Interrupts() as interrupts:
            local_stop = combine(
                interrupts.check,
                limits.check if limits.active else None,
                periodic_eval if cfg.train.eval_every else None,
            )

            def should_stop(result: train_loop.TrainResult) -> str | None:
                assert local_stop is not None
                # Rank 0 decides for everyone: signals, clocks and meters differ by rank.
                return parallel.broadcast(local_stop(result), world)

            train_start_j = tracker.total_joules() - (prior_train.joules if prior_train is not None else 0.0)
            if prior_train is not None:
                tracker.windows["train"] = prior_train
            tracker.begin_window("train")
            result = train_loop.train(
                loop, loader, cfg.train, loaded.objective, device, on_log, should_stop, world.size, checkpoints
            )
            tracker.end_window("train")
        if progress is not None:
            progress.close()
        if result.stopped_by == "interrupted":
            return _interrupted(summary, result, interrupts, checkpoints, run_dir, world, log)
        # Periodic evaluations ran inside the train window: their energy is not training's.
        periodic = tracker.windows.pop("eval_periodic", None)
        if periodic:
            train_window = tracker.windows["train"]
            tracker.windows["train"] = energy.Measurement(
                train_window.joules - periodic.joules,
                train_window.seconds - periodic.seconds,
                train_window.method,
                train_window.meter,
            )
            tracker.windows["eval_periodic"] = periodic
        if result.stopped_by:
            log(f"stopped by {result.stopped_by} after {result.steps} of {steps} steps; evaluating and saving")
        after = evaluate("eval_after")
        log(f"held-out loss after: {after['loss']:.4f} (before {before['loss']:.4f})")
        mem = parallel.gather(memory.report(device, p.rss_before_load), world)

        t = time.perf_counter()
        tracker.begin_window("save")
        gathered = parallel.full_state_dict(model, world)  # FSDP: a collective, on every rank
        saved: list[str] = []
        if cfg.output.save_model and world.is_main:
            inner = parallel.unwrap(model)
            if not checkpoint.all_finite(inner):  # the step guards make this unreachable; never save NaN
                raise RuntimeError("non-finite weights after training: not saved")
            saved = save(inner, loaded.tokenizer, run_dir, p.plan.lora, cfg.lora.merge, gathered)
        tracker.end_window("save")
        p.phases["save_s"] = time.perf_counter() - t
        flop_report = _mfu(
            model, loaded, cfg, policy, device, result.tokens / max(result.time_s, 1e-9),
            p.precision_report.get("layers", {}),
        )  # fmt: skip
        energy_summary = _combined_energy(tracker, cfg, world)  # the last collective
        # All ranks leave the process group together, here: rank 0 may go on alone for a long
        # time (the task), and a worker that exits while its peer still holds the group can
        # abort in gloo's threads.
        parallel.teardown(barrier=True)
        if not world.is_main:
            return {"status": "completed", "rank": world.rank}
        task_summary = _task(cfg, model, loaded, world, device, tracker, saved, log) if cfg.task.train else None
        if energy_summary is not None and task_summary is not None and "energy" in task_summary:
            # The task ran on rank 0 after the ranks' energy was summed: add its window.
            task_energy = task_summary["energy"]
            energy_summary["phases"]["task"] = {k: task_energy[k] for k in ("joules", "seconds")}
            energy_summary["joules"] += task_energy["joules"]
            if "co2e_g" in energy_summary:
                energy_summary["co2e_g"] = energy_summary["joules"] / 3.6e6 * energy_summary["grid_g_co2_per_kwh"]
        if energy_summary is not None:
            train_joules = energy_summary["phases"]["train"]["joules"]
            energy_summary["train_joules"] = train_joules
            energy_summary["tokens_per_joule"] = result.tokens * world.size / train_joules if train_joules > 0 else None
            gain = before["loss"] - after["loss"]
            energy_summary["joules_per_loss_point"] = train_joules / gain if gain > 0 else None
        p.phases["train_s"] = result.time_s
        p.phases["eval_s"] = before["time_s"] + after["time_s"]
        tokens = result.tokens * world.size  # every rank processes the same number of tokens
        summary.update(
            {
                "status": "stopped_by_budget" if result.stopped_by in BUDGETS else "completed",
                "stopped_by": result.stopped_by,
                "budget": limits.summary(result),
                "early_stop": {"history": stopper.history, "best": stopper.best} if stopper.history else None,
                "objective": loaded.objective,
                "model": {
                    "source": loaded.source,
                    "parameters": p.counts,
                    "trainable_blocks": p.plan.blocks,
                    "n_blocks": p.plan.n_blocks,
                    "lora": p.plan.lora,
                    "newly_initialised": loaded.fresh,
                    "saved": saved,
                },
                "data": p.blocks.stats,
                "steps": result.steps,
                "resumed_from_step": resumed_at if resumed is not None else None,
                "reliability": {
                    "nonfinite_steps": result.nonfinite_steps,
                    "rollbacks": result.rollbacks,
                    "lr_scale": result.lr_scale,
                    "memory_events": result.memory_events,
                    "micro_batch_size_used": -(-cfg.train.micro_batch_size // result.micro_batch_splits),
                    "grad_accum_used": cfg.train.grad_accum * result.micro_batch_splits,
                },
                "epochs": loader.epochs_done,
                "tokens": tokens,
                "target_tokens": result.target_tokens,
                "time_s": result.time_s,
                "tokens_per_s": tokens / max(result.time_s, 1e-9),
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
                "precision": {**policy.summary(), **p.precision_report},
                "energy": energy_summary,
                "memory": _memory_summary(mem),
                "mfu": flop_report["mfu"],
                "flops": flop_report,
                "task": task_summary,
                "parallel": {"world_size": world.size, "strategy": world.strategy},
                "phases_s": p.phases,
                "environment": environment.describe(device),
            }
        )
    except BaseException as e:
        if world.is_main:
            summary["error"] = f"{type(e).__name__}: {e}"
            summary["environment"] = environment.describe(device)
            rundir.write_json(run_dir / "summary.json", summary)
        raise
    rundir.write_json(run_dir / "summary.json", summary)
    # Finished: the checkpoint's optimizer state is no longer needed (the model is saved).
    (run_dir / checkpoint.FILENAME).unlink(missing_ok=True)
    return summary


def _check_room(cfg: RunConfig, out: Path, p: Prepared) -> None:
    """Refuse to start when the disk cannot take the checkpoints and the saved model."""
    needed = 0
    if cfg.train.save_every is not None:
        needed += 2 * checkpoint.bytes_needed(p.model, p.policy)  # the new one beside the old
    if cfg.output.save_model:
        needed += layerwise.weight_bytes(p.model) if not p.plan.lora else checkpoint.bytes_needed(p.model, p.policy)
    rundir.check_room(out, needed, "the checkpoints and the saved model")


def _interrupted(
    summary: dict[str, Any],
    result: train_loop.TrainResult,
    interrupts: Interrupts,
    checkpoints: checkpoint.RunCheckpoints | None,
    run_dir: Path,
    world: parallel.World,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """A signal stopped training: the checkpoint is written; say so, and how to go on."""
    kept = checkpoints is not None and checkpoints.saved_at == result.steps
    summary.update(
        {
            "status": "interrupted",
            "signal": interrupts.name,
            "steps": result.steps,
            "checkpoint": checkpoint.FILENAME if kept else None,
        }
    )
    if world.is_main:
        rundir.write_json(run_dir / "summary.json", summary)
    log(
        f"{interrupts.name}: stopped after step {result.steps}; "
        + ("checkpoint saved, rerun the same command to resume" if kept else "no checkpoint (FSDP): rerun to restart")
    )
    return summary


def _memory_summary(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's memory report, plus every rank's peak (max and sum) under data parallelism."""
    out = dict(per_rank[0])
    if len(per_rank) > 1:
        key = out["compare_with"]
        peaks = [m[key] for m in per_rank]
        out.update({"per_rank_peak_bytes": peaks, "max_rank_peak_bytes": max(peaks), "sum_peak_bytes": sum(peaks)})
    return out


def _task(
    cfg: RunConfig,
    model: Any,
    loaded: models.LoadedModel,
    world: parallel.World,
    device: torch.device,
    tracker: Any,
    saved: list[str],
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    """The downstream task on rank 0: base vs the adapted backbone (from memory, or as saved
    when FSDP holds it in shards)."""
    if world.strategy == "fsdp":
        if not saved:
            log("note: with FSDP the task reads the saved model; output.save_model is off, so run `ecoadapt evaluate`")
            return None
        backbone = downstream.adapted_backbone(cfg)
    else:
        backbone = downstream.backbone_state(parallel.unwrap(model))
    tracker.begin_window("task")
    task = downstream.compare(cfg, loaded.tokenizer, backbone, device)
    task["energy"] = measurement_dict(tracker.end_window("task"))
    return task
