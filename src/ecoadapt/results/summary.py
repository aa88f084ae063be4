"""summary.json: the typed record of a run, the one schema that adapt writes and report, sweep
and the command line read.

Each field's docstring is its reference (``ecoadapt keys --summary`` prints them all). Sections
whose keys depend on the hardware or the meter (energy, memory, flops, precision) stay
mappings; their keys are listed in the field's docstring. No torch here: reports are read on
machines without it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ecoadapt.config import schema
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError
from ecoadapt.results.judged import HarnessResult, TaskResult

Status = Literal["completed", "stopped_by_budget", "interrupted", "failed"]
FINISHED = ("completed", "stopped_by_budget")  # statuses whose results count (and are not rerun)


@dataclass
class GeneralSummary:
    """The general text's loss before and after training (data.general_eval): forgetting."""

    sources: list[str]
    """Where the general text came from."""
    blocks: int
    """Blocks evaluated (data.eval_max_blocks at most)."""
    target_tokens: int
    """Tokens scored."""
    loss_before: float
    """Mean loss per target token before training (nats)."""
    loss: float
    """Mean loss per target token after training."""
    change: float
    """loss - loss_before: above 0 the model got worse at general text (forgot)."""
    ci_low: float | None
    """95% interval of the change, paired batch by batch (the same blocks and masks): low end."""
    ci_high: float | None
    """High end of that interval."""
    batches: int
    """Pairs the interval is over."""
    verdict: str
    """forgot, improved, no detectable change, or cannot tell."""
    verdict_text: str
    """The verdict in a sentence, with the figures."""


@dataclass
class EvalSummary:
    """Held-out language-modelling scores before and after training (the same blocks and masks)."""

    loss_before: float
    """Mean loss per target token before training."""
    loss: float
    """Mean loss per target token after training."""
    perplexity_before: float
    """exp(loss_before) (pseudo-perplexity of the masked tokens for masked LM)."""
    perplexity: float
    """exp(loss)."""
    accuracy_before: float | None
    """Arg-max accuracy on target tokens before training (None: not measured, as in a Trainer
    run's evaluation)."""
    accuracy: float | None
    """Arg-max accuracy on target tokens after training."""
    target_tokens: int | None
    """Tokens scored."""
    blocks: int | None
    """Held-out blocks evaluated (data.eval_max_blocks at most)."""
    general: GeneralSummary | None = None
    """The general text's loss before and after (data.general_eval; None: off)."""


@dataclass
class ModelSummary:
    """What was adapted, and what of it trained."""

    source: str
    """Where the model came from (folder, GGUF file, cache, package)."""
    parameters: dict[str, int]
    """Parameter counts: total, trainable."""
    trainable_blocks: list[int]
    """Indices of the transformer blocks with trainable weights."""
    n_blocks: int
    """Transformer blocks in the model."""
    lora: bool
    """Whether LoRA adapters trained instead of the weights."""
    newly_initialised: list[str]
    """Modules that had no pretrained weights (a masked-LM head MiniLM was saved without)."""
    saved: list[str]
    """Folders written in the run directory (adapter, model)."""


@dataclass
class ReliabilitySummary:
    """What the loop's guards did."""

    nonfinite_steps: int
    """Optimizer steps skipped because the loss or gradients were NaN or inf."""
    rollbacks: int
    """Returns to the last checkpoint after train.nonfinite_patience such steps in a row."""
    lr_scale: float
    """Learning-rate multiplier after rollbacks (1.0 without)."""
    memory_events: list[dict[str, Any]]
    """Each out-of-memory retry: step, error, micro-batch before and after."""
    micro_batch_size_used: int
    """Blocks per micro-batch that fit (train.micro_batch_size unless auto_micro_batch shrank it)."""
    grad_accum_used: int
    """Micro-batches per optimizer step that ran (the same effective batch)."""


@dataclass
class ParallelSummary:
    """The processes that trained together."""

    world_size: int
    """Processes (ranks) in the job."""
    strategy: str
    """none, ddp or fsdp."""


@dataclass
class RunSummary:
    """A run's summary.json. Figures are the job's (all ranks), training's window apart from
    evaluation's; units are in the names (_s seconds, _bytes bytes, joules J)."""

    status: Status
    """completed, stopped_by_budget (a budget or early stop ended training; the model is saved),
    interrupted (a signal; a checkpoint lets the same command resume), failed (see error)."""
    config: dict[str, Any]
    """The resolved configuration (what config.yaml holds)."""
    rank: int = 0
    """The rank that returned this summary: only rank 0's is written; others hold nothing else."""
    error: str | None = None
    """Why the run failed."""
    signal: str | None = None
    """The signal that interrupted the run."""
    checkpoint: str | None = None
    """The checkpoint an interrupted run left to resume from."""
    stopped_by: str | None = None
    """The budget (energy_j, time_s, tokens), early_stop or target_loss that ended training early."""
    budget: dict[str, Any] | None = None
    """limits, used (the job's), fraction_used, stopped_by, forecast."""
    early_stop: dict[str, Any] | None = None
    """history ([step, held-out loss] pairs) and best, when train.eval_every is set."""
    target: dict[str, Any] | None = None
    """train.target_loss: loss, reached, and where it was reached (step, tokens, train_joules,
    eval_loss), best_eval_loss, steps_run."""
    objective: str | None = None
    """mlm or clm."""
    model: ModelSummary | None = None
    """What was adapted."""
    data: dict[str, Any] | None = None
    """Corpus statistics: sources, documents, blocks, tokens, the token store's cache key."""
    steps: int | None = None
    """Optimizer steps taken."""
    resumed_from_step: int | None = None
    """The checkpoint's step when the run resumed."""
    epochs: float | None = None
    """Passes over the training blocks (fractional)."""
    tokens: int | None = None
    """Input tokens trained on, all ranks."""
    target_tokens: int | None = None
    """Tokens the loss was computed on, all ranks."""
    time_s: float | None = None
    """Wall time of the training loop (no loading, no evaluation), every part of a resumed run."""
    tokens_per_s: float | None = None
    """tokens / time_s, measured."""
    train_loss: float | None = None
    """Mean training loss per target token over the last logging window."""
    eval: EvalSummary | None = None
    """Held-out scores before and after."""
    reliability: ReliabilitySummary | None = None
    """What the loop's guards did (skipped steps, rollbacks, out-of-memory retries)."""
    batch: dict[str, Any] | None = None
    """The step's batch: tokens_per_step (all processes), blocks_per_step (per process),
    micro_batch_size and micro_batches that ran, and how the micro-batch was chosen."""
    precision: dict[str, Any] | None = None
    """mode, compute_dtype, notes, skipped fp16 steps, loss scale, master-weight bytes, and per-layer
    details (layers, layers_effective, search, weight_bytes, matmul_speedup_vs_fp32)."""
    energy: dict[str, Any] | None = None
    """joules (all phases), train_joules, mj_per_token (training's mJ per training token),
    method (measured | estimated), meter, phases (joules,
    seconds, watts per window: load, eval, train, eval_periodic, eval_after, save, task),
    details (formula and inputs of an estimate), tokens_per_joule, co2e_g, joules_above_idle;
    summed over ranks (per_rank_joules), wall seconds counted once."""
    memory: dict[str, Any] | None = None
    """device, method, compare_with (the figure ratios use), peak_bytes, and per window
    train_peak_bytes / eval_peak_bytes (CUDA: allocated, with *_reserved_bytes; CPU: resident
    set, with *_above_baseline_bytes over the resident set before the model loaded); per rank
    under data parallelism."""
    mfu: float | None = None
    """Model FLOPs utilisation of the training loop (None when the peak is unknown or exceeded)."""
    flops: dict[str, Any] | None = None
    """model_flops_per_token, achieved and peak FLOP/s, where the peak came from, the count's parts."""
    head_first: dict[str, Any] | None = None
    """train.head_first_steps on the new head alone: steps, tokens, time_s, train_loss (inside
    training's time and energy window, not in steps, tokens or time_s above)."""
    notes: list[str] | None = None
    """What the user should know about how this run adapted (a newly initialised head, ...)."""
    compile: dict[str, Any] | None = None
    """train.compile: setting, compiled (off, loss, blocks), compile_s (dynamo's compile seconds,
    all windows), training_compile_s (those inside training's window and its time and energy),
    graphs, fallback (why eager was used instead)."""
    forecast: dict[str, Any] | None = None
    """The run's forecast from its own first steps (measure.forecast: peak memory, seconds per
    step, joules; ``source`` says what it came from), beside the measured figures and their
    ratios (forecast / measured)."""
    task: TaskResult | None = None
    """The downstream task (task.train): each seed's base and adapted scores, the gain paired by
    seed with its interval, the verdict; or status failed with the error (see its fields)."""
    harness: HarnessResult | None = None
    """task.harness, the evaluation harness on base and adapted model: per task each model's
    metric with its standard error and the difference paired by item; or status failed."""
    parallel: ParallelSummary | None = None
    """The processes that trained together."""
    phases_s: dict[str, float] | None = None
    """Seconds per phase: load_s, tokenize_s, train_s, eval_s, save_s."""
    environment: dict[str, Any] | None = None
    """Software versions, device, CPU, GPU."""

    @property
    def finished(self) -> bool:
        """Whether the run's results count (completed, or stopped by a budget)."""
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        """Plain data for summary.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "summary.json") -> RunSummary:
        """Read a summary back, every field checked against this schema.

        Raises:
            UserError: a field of the wrong type, or a key this schema does not have.
        """
        return schema.build(cls, data, source)

    @property
    def exit_status(self) -> int:
        """The command's exit status for this run: 0 done, 1 the task failed (the adaptation's
        results are kept), 128 + the signal's number when a signal ended it (the shell's way)."""
        import signal

        if self.status == "interrupted":
            return 128 + int(signal.Signals[self.signal or "SIGTERM"])
        return 1 if self.task is not None and self.task.failed else 0

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """The summary.json file at ``path`` (see :func:`read`)."""
        return read(Path(path))

    def save(self, path: str | Path) -> None:
        """Write this summary to ``path`` (a summary.json), atomically."""
        write(Path(path), self)

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> RunSummary:
        """The summary.json of a run folder.

        Raises:
            UserError: no summary there, or one that does not read as this schema.
        """
        return read(Path(run_dir) / "summary.json")


def read(path: Path) -> RunSummary:
    """The summary.json at ``path``.

    Raises:
        UserError: the file is missing, unreadable, not JSON, or not a summary.
    """
    try:
        data = storage.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no summary.json there (is it a run folder whose run has finished?)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as a summary ({e}); rerun the run to write it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a summary is a JSON object, this holds a {type(data).__name__}")
    return RunSummary.from_dict(data, str(path))


def write(path: Path, summary: RunSummary) -> None:
    """Write summary.json atomically; a figure that is not a finite number (a NaN loss) is
    written as null, which the schema reads back, never as JSON's non-standard NaN."""
    storage.write_json(path, finite(summary.to_dict()))


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def reference() -> list[tuple[str, str, Any, str]]:
    """Every summary field as (dotted name, type, default, help), for ``ecoadapt keys --summary``."""
    return schema.describe(RunSummary)
