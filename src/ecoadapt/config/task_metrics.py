"""The task's metrics: one table, the single source every other list of them reads.

Adding a metric is a row here plus its computation in ``task/metrics.py``'s ``classification``;
``task.metric``'s allowed values are held to this table by ``tests/test_docs.py``, and the
verdict's floor (what always predicting the test set's majority class scores) comes from the
row. No torch here: the config layer reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskMetric:
    """One classification metric.

    Attributes:
        name: the value of ``task.metric`` and the key of the score.
        meaning: what it measures, in words.
        floor: what always predicting the majority class scores, from (the majority class's
            share of the test set, the number of classes in the test set).
    """

    name: str
    meaning: str
    floor: Callable[[float, int], float]


METRICS: dict[str, TaskMetric] = {
    m.name: m
    for m in (
        TaskMetric("accuracy", "share of test examples classified right", lambda share, classes: share),
        # The majority class's F1, 0 for every other class present.
        TaskMetric(
            "macro_f1",
            "mean of the classes' F1 (each class counts the same)",
            lambda share, classes: 2 * share / (1 + share) / classes,
        ),
        TaskMetric("micro_f1", "F1 over every decision (accuracy, for one label each)", lambda share, classes: share),
    )
}
