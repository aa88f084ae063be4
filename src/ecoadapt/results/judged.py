"""The judges' results, typed: the labelled task's (paired by seed) and the evaluation harness's
(paired by item), as summary.json, ``ecoadapt evaluate``, the report and the model card read
them. No torch here: reports are read on machines without it.

A judge that failed is the same type with ``status: failed``, its ``error``, how to ``retry``,
and the energy its window spent; the adaptation's results are kept beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ecoadapt.config import schema

JudgeStatus = Literal["completed", "failed"]


@dataclass
class PairedGain:
    """Adapted minus base, paired (by seed for the task, by item for the harness; a gain is an
    improvement whichever way the metric points): the mean with its 95% interval."""

    mean: float
    """The mean paired difference, in the metric's units."""
    ci_low: float | None = None
    """The 95% interval's lower bound (None: too few pairs for one)."""
    ci_high: float | None = None
    """The 95% interval's upper bound."""
    n: int = 0
    """How many pairs (seeds or items)."""
    per_seed: dict[str, float] | None = None
    """The task's difference per seed (the seed as text, as JSON keys are); None for the harness."""


@dataclass
class SeedScores:
    """One seed of the task: the base model's and the adapted model's scores."""

    seed: int
    base: dict[str, Any] | None = None
    """The base model's scores: each metric of task.metric's table, train_examples, joules,
    seconds, cached (computed by an earlier run), recorded (by an earlier attempt of this one)."""
    adapted: dict[str, Any] | None = None
    """The adapted model's scores, as ``base``'s; None when no adapted model was judged."""


@dataclass
class TaskResult:
    """The downstream task (task.train): base and adapted model on every seed, the paired gain
    with its interval, and the verdict in words."""

    status: JudgeStatus = "completed"
    """completed, or failed (then error and retry say why and what to do)."""
    error: str | None = None
    """Why the task failed (status failed)."""
    retry: str | None = None
    """How to run it again once the cause is fixed (status failed)."""
    metric: str | None = None
    """task.metric: the score the verdict is on."""
    mode: str | None = None
    """task.mode: finetune or probe."""
    precision: str | None = None
    """The precision the task ran in (task.precision, resolved for the device)."""
    labels: list[str] = field(default_factory=list)
    """The task's labels, in their order."""
    classes: dict[str, Any] | None = None
    """train_counts and test_counts per label, majority_class_accuracy, imbalance_ratio."""
    bad_records: dict[str, Any] | None = None
    """The task files' records that were skipped, counted by reason."""
    floor: float | None = None
    """A trivial classifier's score on the test set (config/task_metrics.py)."""
    per_seed: list[SeedScores] = field(default_factory=list)
    """Each seed's scores: seed, base and adapted (each a mapping: every metric's value,
    train_examples, joules, seconds, cached, recorded)."""
    base: float | None = None
    """The base model's mean score over seeds."""
    base_std: float | None = None
    """The base model's standard deviation over seeds."""
    adapted: float | None = None
    """The adapted model's mean score over seeds (None: not judged)."""
    adapted_std: float | None = None
    """The adapted model's standard deviation over seeds."""
    delta: float | None = None
    """adapted minus base (the paired gain's mean)."""
    gain: PairedGain | None = None
    """The gain paired by seed, with its interval."""
    verdict: str | None = None
    """helped, hurt or no detectable effect."""
    verdict_text: str | None = None
    """The verdict with its figures, in a sentence."""
    evaluation_joules: float = 0.0
    """Joules of the scores computed in this run (cached ones excluded)."""
    base_cached: int = 0
    """How many of the base model's seeds came from the cache."""
    time_s: float | None = None
    """Seconds the task took in this attempt."""
    energy: dict[str, Any] | None = None
    """The task's energy window: joules, seconds, method, meter (and resumed_seeds: what an
    earlier, killed attempt scored and spent)."""

    @property
    def failed(self) -> bool:
        """Whether the task failed (the adaptation's results are kept)."""
        return self.status == "failed"

    def adapted_by_seed(self) -> dict[int, float]:
        """The adapted model's score on each seed."""
        if self.metric is None:
            return {}
        return {s.seed: s.adapted[self.metric] for s in self.per_seed if s.adapted is not None}

    def gain_by_seed(self) -> dict[int, float]:
        """The paired gain on each seed."""
        return {int(seed): value for seed, value in ((self.gain.per_seed if self.gain else None) or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for summary.json and task.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "task") -> TaskResult:
        """Read back, every key checked (raises UserError naming a wrong one)."""
        return schema.build(cls, data, source)


@dataclass
class HarnessTask:
    """One harness task: each model's metric with its standard error, and the difference paired
    by item."""

    name: str
    metric: str
    """The task's headline metric (its first aggregation)."""
    higher_is_better: bool = True
    base: float | None = None
    base_stderr: float | None = None
    """The standard error of the base model's metric over items (None: not a mean over items)."""
    items: int | None = None
    """How many items were scored (None: the metric is not a mean over items)."""
    adapted: float | None = None
    adapted_stderr: float | None = None
    gain: PairedGain | None = None
    """adapted minus base paired by item (a fall counts as a gain where lower is better)."""
    verdict: str | None = None
    verdict_text: str | None = None
    """The verdict in a sentence, or why the task was not paired."""


@dataclass
class HarnessResult:
    """task.harness: the evaluation harness's tasks on the base and the adapted model."""

    status: JudgeStatus = "completed"
    """completed, or failed (then error and retry say why and what to do)."""
    error: str | None = None
    """Why the harness failed (status failed)."""
    retry: str | None = None
    """How to run it again once the cause is fixed (status failed)."""
    harness_version: str | None = None
    """lm-evaluation-harness's version."""
    precision: str | None = None
    """The precision the models were scored in (task.precision, resolved for the device)."""
    fewshot: int = 0
    """task.harness_fewshot."""
    limit: int | None = None
    """task.harness_limit: items per task (None: all)."""
    seed: int | None = None
    """The few-shot draws' seed (task.seeds' first)."""
    tasks: list[HarnessTask] = field(default_factory=list)
    """Per task: name, metric, higher_is_better, base and adapted with their standard errors,
    items, gain (paired by item: mean, ci_low, ci_high, n), verdict, verdict_text."""
    base_cached: bool = False
    """Whether the base model's results came from the cache."""
    evaluation_joules: float = 0.0
    """Joules of the models scored in this run (a cached base excluded)."""
    resumed_records: list[dict[str, float]] = field(default_factory=list)
    """Joules and seconds of each model an earlier, killed attempt scored (added to the window's)."""
    time_s: float | None = None
    """Seconds the harness took in this attempt."""
    energy: dict[str, Any] | None = None
    """The harness's energy window: joules, seconds, method, meter."""

    @property
    def failed(self) -> bool:
        """Whether the harness failed (the adaptation's results are kept)."""
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for summary.json and harness.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "harness") -> HarnessResult:
        """Read back, every key checked (raises UserError naming a wrong one)."""
        return schema.build(cls, data, source)


Judged = TaskResult | HarnessResult
JudgedT = TypeVar("JudgedT", TaskResult, HarnessResult)  # a function that returns the judge's own type


@dataclass
class Judgement:
    """What ``ecoadapt evaluate`` found: the judges the config names, each None when not named."""

    task: TaskResult | None = None
    harness: HarnessResult | None = None

    def each(self) -> list[Judged]:
        """The judges that ran, task first."""
        return [j for j in (self.task, self.harness) if j is not None]
