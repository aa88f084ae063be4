"""Paired statistics for "did adaptation help?": per-seed differences, Student-t intervals,
verdicts in words, and the share of a baseline's gain that a cheaper recipe keeps.

Base and adapted classifiers share each seed (the same head initialisation, data order and
dropout draws), so the per-seed difference cancels most of the seed's noise: its interval is
far tighter than comparing two independent means. Pure Python (no torch): the report uses it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from ecoadapt.config.task_metrics import METRICS

CONFIDENCE = 0.95
"""Two-sided confidence level of every interval ecoadapt reports."""

FLOOR_MARGIN = 0.02
"""A score within this much (absolute) of a trivial classifier's counts as "at the floor"."""


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1 (got p={p}, df={df})")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


PLURALS = {"batch": "batches"}  # of Interval.unit, where adding an s is wrong


@dataclass
class Interval:
    """A mean with its two-sided confidence interval (None bounds: too few values), over ``n``
    values of ``unit`` (seed, item, batch: what the values were paired by)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    unit: str = "seed"

    @property
    def known(self) -> bool:
        """Whether there is an interval at all (two values or more)."""
        return self.low is not None and self.high is not None

    def text(self, fmt: str = "+.4f") -> str:
        """E.g. "+0.0440 (95% CI +0.0210 to +0.0670, 5 seeds)"."""
        seeds = f"{self.n} {self.unit if self.n == 1 else PLURALS.get(self.unit, self.unit + 's')}"
        if not self.known:
            return f"{self.mean:{fmt}} ({seeds}: no interval)"
        return f"{self.mean:{fmt}} ({CONFIDENCE:.0%} CI {self.low:{fmt}} to {self.high:{fmt}}, {seeds})"

    def as_dict(self) -> dict[str, float | int | None]:
        """For summary.json."""
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def mean_interval(values: list[float], unit: str = "seed") -> Interval:
    """The mean of ``values`` with its Student-t interval over them (one value per ``unit``)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, None, n, unit)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, unit)


def paired_gain(base: Mapping[int, float], adapted: Mapping[int, float]) -> tuple[Interval, dict[int, float]]:
    """Adapted minus base on the seeds both have: the mean gain, its interval, and per seed.

    Raises:
        ValueError: the two share no seed.
    """
    seeds = sorted(set(base) & set(adapted))
    if not seeds:
        raise ValueError("base and adapted share no seed: a paired difference needs the same seeds")
    per_seed = {s: adapted[s] - base[s] for s in seeds}
    return mean_interval(list(per_seed.values())), per_seed


def trivial_score(metric: str, test_counts: Mapping[str, int]) -> float:
    """What always predicting the test set's majority class scores on ``metric`` (the metrics'
    table, :mod:`ecoadapt.config.task_metrics`, gives each one's rule)."""
    share = max(test_counts.values()) / sum(test_counts.values())
    return METRICS[metric].floor(share, len(test_counts))


@dataclass
class Verdict:
    """Whether adaptation changed the task: a word and a sentence saying why."""

    word: str
    """helped, hurt, no detectable effect, or cannot tell."""
    text: str


def verdict(gain: Interval, base_mean: float, adapted_mean: float, floor: float | None) -> Verdict:
    """The verdict on a paired gain.

    Args:
        gain: adapted minus base, per seed, with its interval.
        base_mean: the base classifiers' mean score.
        adapted_mean: the adapted classifiers' mean score.
        floor: a trivial classifier's score (None: unknown).
    """
    if floor is not None and max(base_mean, adapted_mean) <= floor + FLOOR_MARGIN:
        return Verdict(
            "cannot tell",
            f"base ({base_mean:.4f}) and adapted ({adapted_mean:.4f}) both score about what predicting the "
            f"majority class scores ({floor:.4f}): the fine-tune learnt nothing to compare; raise task.epochs, "
            "task.lr or task.max_train_examples, or try task.mode: probe",
        )
    if not gain.known:
        return Verdict(
            "cannot tell",
            f"gain {gain.text()}: one seed gives no interval; set task.seeds to 3 or more (5 for a tight one)",
        )
    word = {1: "helped", -1: "hurt", 0: "no detectable effect"}[side(gain)]
    return Verdict(word, f"{'adaptation ' if word != 'no detectable effect' else ''}{word}: {gain.text()}")


def side(interval: Interval) -> int:
    """Where a known interval lies: 1 wholly above 0, -1 wholly below, 0 holding it (no detectable
    difference)."""
    assert interval.low is not None and interval.high is not None
    return 1 if interval.low > 0 else -1 if interval.high < 0 else 0


def retained_gain(recipe: Mapping[int, float], baseline: Mapping[int, float]) -> Interval | None:
    """The share of the baseline recipe's gain that ``recipe`` keeps, paired by seed.

    Ratio of mean gains with a delta-method interval that accounts for the two gains being
    measured on the same seeds (they share the base classifier). None when fewer than two seeds
    are shared or the baseline's mean gain is not positive (a share of nothing is meaningless;
    callers check first that the baseline's gain is detectable).
    """
    seeds = sorted(set(recipe) & set(baseline))
    n = len(seeds)
    if n < 2:
        return None
    r = [recipe[s] for s in seeds]
    b = [baseline[s] for s in seeds]
    mean_r, mean_b = statistics.fmean(r), statistics.fmean(b)
    if mean_b <= 0:
        return None
    ratio = mean_r / mean_b
    var_r, var_b = statistics.variance(r) / n, statistics.variance(b) / n
    cov = statistics.covariance(r, b) / n
    spread = math.sqrt(max(var_r - 2 * ratio * cov + ratio * ratio * var_b, 0.0)) / mean_b
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * spread
    return Interval(ratio, ratio - half, ratio + half, n)


def loss_change_verdict(change: Interval, what: str = "general-text loss") -> Verdict:
    """The verdict on a paired change of a loss (after minus before; a rise is forgetting).

    Args:
        change: the per-batch (or per-item) differences' mean with its interval.
        what: the loss, for the sentence.
    """
    if not change.known:
        return Verdict("cannot tell", f"{what} changed {change.text()}: too few batches for an interval")
    word, moved, meaning = {
        1: ("forgot", "rose", "adapting cost the model there"),
        -1: ("improved", "fell", "adapting helped there too"),
        0: ("no detectable change", "changed", "no detectable forgetting"),
    }[side(change)]
    return Verdict(word, f"{what} {moved} {change.text()}: {meaning}")
