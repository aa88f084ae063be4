"""What a run sets up before its run directory exists: model, corpus, what trains, precision.

Every step here can fail on bad input (a model that does not load, a corpus record without its
text field, a layer map that matches nothing), and all of them run before anything is written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ecoadapt.config import RunConfig
from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.data import corpus, general
from ecoadapt.data.batches import Blocks, MaskSpec
from ecoadapt.measure import flops, memory
from ecoadapt.measure.energy import EnergyTracker
from ecoadapt.measure.memory import MemoryWindows
from ecoadapt.measure.phases import Phases
from ecoadapt.model import adapters, compiling, layerwise, parallel, pretrained, quantize
from ecoadapt.model.load_spec import Recipe
from ecoadapt.model.losses import LossModule, encoder_and_head
from ecoadapt.model.precision import AUTOCAST_DTYPES, DTYPES, Policy
from ecoadapt.train.heldout import heldout
from ecoadapt.train.loop import total_steps


def mask_spec(tokenizer: Any, probability: float) -> MaskSpec:
    """What masking needs from an MLM tokenizer."""
    return MaskSpec(
        mask_id=int(tokenizer.mask_token_id),
        vocab_size=len(tokenizer),
        special_ids=sorted(set(tokenizer.all_special_ids)),
        probability=probability,
    )


def prepare(
    cfg: RunConfig,
    base: Any,
    device: torch.device,
    world: parallel.World,
    tracker: EnergyTracker,
    log: Callable[[str], None],
    windows: MemoryWindows | None = None,
) -> Prepared:
    """Load the model, tokenize the corpus, choose what trains and in which precision, wrap.

    ``windows``: where the load's peak memory is measured (its window, ``load``, spans reading
    the weights, tokenizing and making the recipe's model: everything before the first step).
    """
    rss_before_load = memory.rss_bytes()
    phases: dict[str, float] = {}
    t = time.perf_counter()
    log(f"loading {cfg.model.name_or_path} ...")
    # The memory window spans everything before the first step (its peak is reported beside
    # training's); the energy window, loading and tokenizing (the precision checks inside build
    # are windows of their own: the tool's overhead).
    with Phases(tracker, windows).window("load", energy=False):
        with Phases(tracker).window("load"):
            loaded = load_model(cfg, device, world)
            phases["load_s"] = time.perf_counter() - t
            if loaded.fresh:
                log(f"newly initialised (trained from scratch): {', '.join(loaded.fresh)}")
            t = time.perf_counter()
            blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective, base)
            general_blocks = general.build(cfg.data, loaded.tokenizer, loaded.objective, base, blocks.stats)
            phases["tokenize_s"] = time.perf_counter() - t
        if cfg.task.harness and loaded.objective != "clm":
            raise UserError(
                "task.harness: the harness judges decoders by their log-likelihoods; this is a masked-LM "
                "encoder: judge it with task.train (task.mode: probe or finetune)"
            )
        built = build(cfg, loaded, blocks.train, device, world, log, phases=Phases(tracker))
    _describe_corpus(blocks, general_blocks, cfg, world, log)
    log(_what_trains(cfg, loaded.objective, device, built.counts, built.plan, world))
    return Prepared(
        built, loaded=loaded, blocks=blocks, general=general_blocks, rss_before_load=rss_before_load, phases=phases
    )


def load_model(
    cfg: RunConfig, device: torch.device, world: parallel.World | None = None, guard: bool = True
) -> pretrained.LoadedModel:
    """The run's model, read as its recipe says (:mod:`ecoadapt.model.load_spec`): in the storage
    dtype, a QLoRA base quantized as it loads onto ``device``; refused before reading when its
    weights cannot fit the memory free there, or train.max_memory_gb (``guard``; `plan`'s trial
    steps turn it off: their own out-of-memory guard reports a recipe that does not fit)."""
    # FSDP shards the model in host memory: it loads there.
    load_device = torch.device("cpu") if world is not None and world.strategy == "fsdp" else device
    limit = None
    if cfg.train.max_memory_gb is not None and guard:
        held = torch.cuda.memory_allocated(load_device) if load_device.type == "cuda" else memory.rss_bytes()
        limit = int(cfg.train.max_memory_gb * 2**30) - held
    # A full fine-tune keeps every weight's gradient and optimizer state where it loads (FSDP
    # shards them across ranks instead; plan's trial steps have their own guard).
    sharded = world is not None and world.strategy == "fsdp"
    trains_all = guard and not sharded and not cfg.lora.enabled and cfg.train.trainable_layers == "all"
    return pretrained.load(
        cfg.model, cfg.data.max_seq_len, cfg.train.seed, Recipe.of(cfg), load_device, memory_limit_bytes=limit,
        trains_every_weight_with=cfg.train.optimizer if trains_all else None,
    )  # fmt: skip


@dataclass
class Built:
    """A loaded model made into the recipe's training model (see :func:`build`)."""

    model: Any
    plan: adapters.TrainablePlan
    policy: Policy
    mask: MaskSpec | None
    precision_report: dict[str, Any]
    counts: dict[str, int]
    compiled: compiling.CompileClock


@dataclass
class Prepared:
    """Everything a run sets up before its run directory exists: the recipe and around it.

    Attributes:
        recipe: the model as it trains, what trains, precision policy, masking, per-layer
            precision report, parameter counts, what train.compile compiled (:class:`Built`).
        loaded: the model as loaded, its tokenizer and objective.
        blocks: the tokenized, split corpus.
        general: the general text's blocks (data.general_eval), or None.
        rss_before_load: resident set (bytes) just before the model loaded.
        phases: seconds of loading and tokenizing.
    """

    recipe: Built
    loaded: pretrained.LoadedModel
    blocks: corpus.TokenBlocks
    general: general.GeneralBlocks | None
    rss_before_load: int
    phases: dict[str, float] = field(default_factory=dict)


def build(
    cfg: RunConfig,
    loaded: pretrained.LoadedModel,
    train_blocks: Blocks,
    device: torch.device,
    world: parallel.World,
    log: Callable[[str], None],
    steps: int | None = None,
    phases: Phases | None = None,
) -> Built:
    """What trains (LoRA, blocks), in which precision, compiled and wrapped, on ``device``:
    the recipe, the same for a run and for `ecoadapt plan`'s probe. ``steps``: the run's length
    (train.compile's auto depends on it); default: train.max_steps or train.epochs over
    ``train_blocks``. ``phases``: where the precision checks (the layer-wise search's
    calibration, the 16-bit speed check) are measured, as the tool's own overhead."""
    # FSDP shards the model while it is still in host memory and moves only each rank's shard to
    # its GPU: the whole model never has to fit one GPU.
    setup_device = torch.device("cpu") if world.strategy == "fsdp" else device
    policy = Policy(cfg.precision.mode, device.type)
    quantized_base = _quantize_base(cfg, loaded, policy, device, log)
    # A base read in 16 bits under autocast: the residual stream stays fp32, as it is when the
    # embeddings are stored in fp32 (before any PEFT wrapping, which adds hooks of its own).
    policy.keep_residual_fp32(loaded.model)
    model, plan = adapters.prepare(loaded, cfg.train, cfg.lora)
    policy.keep_fp32_weights(model)
    model.to(setup_device)
    if device.type == "cpu":  # a CPU run's trained weights out of the mapped shards (a GPU run copies them anyway)
        pretrained.own_memory_for_trained(model)
    mask = mask_spec(loaded.tokenizer, cfg.data.mlm_probability) if loaded.objective == "mlm" else None
    checks = phases.window("precision_checks", memory=None) if phases else contextlib.nullcontext()
    with checks:
        precision_report = apply_precision(
            model, policy, cfg, train_blocks, loaded.objective, mask, setup_device, device
        )
    if quantized_base is not None:
        precision_report["quantized_base"] = quantized_base.as_dict()
    precision_report["load"] = loaded.spec.as_dict()
    for note in policy.notes:
        log(f"note: {note}")
    counts = pretrained.parameter_counts(model)
    _, block_list = pretrained.transformer_blocks(model)
    if world.strategy == "fsdp":
        parallel.check_fsdp_units(model, block_list)
    loss_module = LossModule(model, loaded.objective)
    steps = steps or total_steps(cfg.train, max(1, len(train_blocks) // world.size))
    # bitsandbytes' quantized matmuls are not compiled (the config refuses an explicit setting).
    compile_setting = False if quantized_base is not None else cfg.train.compile
    compiled = compiling.apply(loss_module, block_list, compile_setting, device.type, steps)
    if compiled.what != "off":
        log(f"compiling: {compiled.what} (train.compile={cfg.train.compile}; in the first steps, counted as training)")
    wrapped = parallel.wrap(loss_module, world, device, block_list)
    return Built(wrapped, plan, policy, mask, precision_report, counts, compiled)


def _quantize_base(
    cfg: RunConfig, loaded: pretrained.LoadedModel, policy: Policy, device: torch.device, log: Callable[[str], None]
) -> quantize.QuantizedBase | None:
    """lora.quantize: the frozen base's block Linears stored in 4 or 8 bits on ``device``; and
    whether train.optimizer's backend can run here."""
    if cfg.train.optimizer != "adamw":
        quantize.bitsandbytes()  # installed, or a UserError now rather than after setup
    if cfg.train.optimizer == "paged_adamw8bit" and device.type != "cuda":
        raise UserError(
            f"train.optimizer: paged_adamw8bit needs CUDA (this run trains on {device.type}); use adamw8bit"
        )
    if cfg.lora.quantize is None:
        return None
    if loaded.quantized is not None:  # quantized while it loaded
        done = loaded.quantized
        log(
            f"frozen base: {done.modules} Linear layers quantized to {done.kind} while loading ({done.backend}), "
            f"{done.bytes_before / 2**20:,.1f} -> {done.bytes_after / 2**20:,.1f} MiB"
        )
        return done
    _, blocks = pretrained.transformer_blocks(loaded.model)
    done = quantize.frozen_base(loaded.model, blocks, cfg.lora.quantize, policy.compute_dtype, device)
    log(
        f"frozen base: {done.modules} Linear layers in {done.kind} ({done.backend}), "
        f"{done.bytes_before / 2**20:,.1f} -> {done.bytes_after / 2**20:,.1f} MiB"
    )
    return done


def _describe_corpus(
    blocks: corpus.TokenBlocks,
    general_blocks: general.GeneralBlocks | None,
    cfg: RunConfig,
    world: parallel.World,
    log: Callable[[str], None],
) -> None:
    stats = blocks.stats
    log(
        f"corpus: {stats['train_documents']} train / {stats['eval_documents']} held-out documents, "
        f"{stats['train_blocks']} blocks of {cfg.data.max_seq_len} tokens (cache {stats['cache']})"
    )
    if general_blocks is not None:
        g = general_blocks.stats
        log(f"general text: {g['blocks']} blocks of {', '.join(g['sources'])}, evaluated before and after")
    if len(blocks.train) < cfg.train.micro_batch_size * world.size:
        log(f"note: only {len(blocks.train)} training blocks; micro-batches repeat blocks within an epoch")


def _what_trains(
    cfg: RunConfig,
    objective: str,
    device: torch.device,
    counts: dict[str, int],
    plan: adapters.TrainablePlan,
    world: parallel.World,
) -> str:
    partial = len(plan.blocks) < plan.n_blocks
    return (
        f"{objective.upper()} on {device.type}, {cfg.precision.mode}: "
        f"{counts['trainable']:,} of {counts['total']:,} parameters train"
        + (f" (LoRA r={cfg.lora.r})" if plan.lora else "")
        + (f", blocks {plan.blocks[0]}-{plan.blocks[-1]} of {plan.n_blocks}" if partial else "")
        + (f", {world.strategy.upper()} over {world.size} processes" if world.distributed else "")
    )


def apply_precision(
    model: Any,
    policy: Policy,
    cfg: RunConfig,
    train_blocks: Blocks,
    objective: str,
    mask: MaskSpec | None,
    device: torch.device,
    train_device: torch.device | None = None,
) -> dict[str, Any]:
    """Store and run the model as precision.mode and precision.layers say.

    Args:
        device: where the model is now (the precision search's calibration runs there).
        train_device: where it will train (layer maps cast for it; the 16-bit matmul probe runs
            there); default ``device``.

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
    unlowered = None if policy.mode in AUTOCAST_DTYPES else policy.compute_dtype  # no autocast to reconcile
    train_device = train_device or device
    if mapping == "auto":
        mapping = _search_layers(model, policy, cfg, train_blocks, objective, mask, device, unlowered, report)
    if mapping:
        report["layers"] = layerwise.apply_map(model, mapping, train_device.type, unlowered)
        if "fp16" in mapping.values():
            policy.use_fp16_layers()
    report["layers_effective"] = layerwise.effective_dtypes(model)
    report["weight_bytes"] = layerwise.weight_bytes(model)
    _note_slow_16_bit(policy, mapping, train_device, report)
    return report


def _search_layers(
    model: Any,
    policy: Policy,
    cfg: RunConfig,
    train_blocks: Blocks,
    objective: str,
    mask: MaskSpec | None,
    device: torch.device,
    unlowered: torch.dtype | None,
    report: dict[str, Any],
) -> dict[str, str]:
    """precision.layers = auto: measure each block's sensitivity and choose the map."""
    blocks_name, blocks = pretrained.transformer_blocks(model)
    calibration = train_blocks[: cfg.precision.calibration_batches * cfg.train.micro_batch_size]
    here = policy if policy.device == device.type else Policy(policy.mode, device.type)  # FSDP: on the host

    def calibration_loss() -> float:
        return heldout(model, calibration, objective, mask, cfg.train.micro_batch_size, here, device).loss

    found = layerwise.search(
        model,
        blocks_name,
        blocks,
        calibration_loss,
        cfg.precision.search_dtype,
        cfg.precision.tolerance,
        device.type,
        default=unlowered,
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
    return found.chosen


def _note_slow_16_bit(
    policy: Policy, mapping: dict[str, str] | None, device: torch.device, report: dict[str, Any]
) -> None:
    """Measure whether the run's 16-bit matmuls are faster than fp32 here; say so when not."""
    lowered = [DTYPES[v] for v in (mapping or {}).values() if v != "fp32"]
    low = policy.compute_dtype if policy.compute_dtype != torch.float32 else (lowered[0] if lowered else None)
    if low is None:
        return
    fast, _ = flops.peak_flops(device, low, None)
    full, _ = flops.peak_flops(device, torch.float32, None)
    report["matmul_speedup_vs_fp32"] = fast / full
    if fast < full:
        policy.notes.append(
            f"{str(low).replace('torch.', '')} matmuls run at {fast / 1e9:,.0f} GFLOP/s on this {device.type} "
            f"vs {full / 1e9:,.0f} for fp32: 16-bit is slower here (measured), about {full / fast:.1f}x fp32's "
            "matmul time and joules; precision.mode: auto picks fp32 on this device"
        )


def flop_count(model: torch.nn.Module, loaded: Any, cfg: RunConfig) -> flops.FlopCount:
    """Model FLOPs per training token of the recipe's ``model`` (unwrapped) as it trains."""
    _, blocks = pretrained.transformer_blocks(model)
    head_fraction = 1.0
    if loaded.objective == "mlm" and encoder_and_head(model) is not None:
        head_fraction = cfg.data.mlm_probability  # only masked positions reach the head, on every rank
    return flops.training_flops(model, blocks, cfg.data.max_seq_len, loaded.model.config.hidden_size, head_fraction)


def mfu(p: Prepared, cfg: RunConfig, device: torch.device, tokens_per_s: float) -> dict[str, Any]:
    """MFU of the training loop: model FLOPs per token x tokens/s over the device's peak."""
    model = parallel.unwrap(p.recipe.model)
    count = flop_count(model, p.loaded, cfg)
    # The peak of the dtype the blocks (nearly all FLOPs) compute in: a layer map can lower them.
    lowered = {v for v in p.recipe.precision_report.get("layers", {}).values() if v != "fp32"}
    dtype = DTYPES[lowered.pop()] if len(lowered) == 1 else p.recipe.policy.compute_dtype
    peak, source = flops.peak_flops(device, dtype, cfg.measure.peak_flops, at_least=count.per_token * tokens_per_s)
    return flops.mfu_report(count, tokens_per_s, peak, source)
