"""The ``task`` section of a run's config: the downstream task and its evaluation protocol
(its own module to keep config.py small; ``ecoadapt.config`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TaskConfig:
    """The downstream task: a labelled text-classification set in the domain."""

    train: list[str] = field(default_factory=list)
    """Labelled training files (.jsonl, .json, .csv, .tsv); empty: no downstream task."""
    test: list[str] = field(default_factory=list)
    """Labelled test files; empty: task.test_fraction of task.train is held out, stratified by
    label, deterministically."""
    text_field: str = "text"
    """Record field (or column) holding the text."""
    label_field: str = "label"
    """Record field (or column) holding the label."""
    json_key: str | None = None
    """Key of the record list inside a .json object (detected when unambiguous)."""
    test_fraction: float = 0.2
    """Fraction of each label's examples held out for testing when task.test is empty."""
    metric: Literal["accuracy", "macro_f1", "micro_f1"] = "accuracy"
    """The headline metric (all three are reported)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds: each runs on the base and on the adapted model; the per-seed difference (adapted
    minus base) gives the gain's mean, its 95% confidence interval (3 seeds or more) and the
    verdict."""
    mode: Literal["finetune", "probe"] = "finetune"
    """finetune: fine-tune a classifier (all weights, or LoRA with task.lora); probe: a linear
    classifier on the frozen model's mean-pooled features (computed once per model), each seed
    fitting it to a bootstrap resample of the training examples: cheap, and low-variance."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """The task's own precision, the same for every recipe so that recipes are compared by one
    protocol: auto is bf16 autocast on a GPU that supports bf16 (fp16 on older ones) and fp32
    on a CPU."""
    bad_records: Literal["error", "skip"] = "error"
    """A record with an empty text or no label: stop with an error naming it (error), or skip it
    and count it in the summary's task.bad_records (skip)."""
    cache: bool = True
    """Reuse the base model's task results computed earlier with the same model, task files,
    task settings and seed (kept in the cache folder; see data.cache_dir): a sweep fine-tunes
    the base once."""
    epochs: float = 3.0
    """Passes over the task's training examples per fine-tune."""
    lr: float = 1e-4
    """Peak learning rate of the fine-tune (AdamW, linear decay, 10% warm-up)."""
    micro_batch_size: int = 32
    """Examples per forward/backward pass."""
    max_seq_len: int = 64
    """Tokens per example (longer texts are truncated)."""
    max_train_examples: int | None = None
    """Fine-tune on at most this many training examples (a deterministic, label-stratified
    subset), to bound the evaluation's cost."""
    max_test_examples: int | None = None
    """Score on at most this many test examples (a deterministic, label-stratified subset), to
    bound the evaluation's cost on large test sets."""
    lora: bool = False
    """Fine-tune LoRA adapters (lora.r, lora.alpha) and the classification head instead of all
    weights."""
    harness: list[str] = field(default_factory=list)
    """Evaluation-harness tasks (EleutherAI's lm-evaluation-harness; pip install
    'ecoadapt[harness]'), judging a decoder as its users do, by log-likelihood: a task YAML
    file (its dataset_path json/csv/text with data_files read from disk, relative paths from the
    YAML's folder: offline), or a task name from the harness's registry (its data from the
    datasets cache, downloaded when online). Each runs on the base and on the adapted model in
    task.precision, base results cached; per task its metric with the standard error, and the
    adapted-minus-base difference paired by item with its 95% interval and a verdict. Needs no
    task.train."""
    harness_fewshot: int = 0
    """Solved examples put before each harness item (few-shot); drawn with the first of
    task.seeds, the same for base and adapted."""
    harness_limit: int | None = None
    """Score at most this many items of each harness task (the first ones), to bound its cost."""
    harness_batch_size: int = 16
    """Requests per forward pass of the harness."""

    @property
    def judged(self) -> bool:
        """Whether anything judges the adapted model: a labelled task or harness tasks."""
        return bool(self.train or self.harness)
