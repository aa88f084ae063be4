"""Labelled examples for the downstream task: reading, checking, splitting, batching."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ecoadapt.config import TaskConfig
from ecoadapt.core.errors import UserError
from ecoadapt.data import readers
from ecoadapt.data.batches import epoch_order


@dataclass
class Example:
    """One labelled text, with where it came from."""

    text: str
    label: str
    where: str


def read(
    sources: list[str], cfg: TaskConfig, bad: readers.BadRecords | None = None, key: str = "task.train"
) -> list[Example]:
    """Read labelled examples; an empty text or a missing field names the file and record and
    goes to ``bad`` (default: an error; task.bad_records: skip counts it instead).

    Raises:
        UserError: a missing file, a bad record (unless skipped), or no example at all.
    """
    bad = bad or readers.BadRecords("error", "task.bad_records")
    out = []
    for source in readers.resolve(sources, key=key):
        for where, record in readers.records(source, cfg.text_field, cfg.json_key, bad):
            try:
                out.append(_example(record, cfg, where))
            except UserError as e:
                bad.handle(e)
    if not out:
        why = f" (every record was skipped; the first: {bad.examples[0]})" if bad.examples else ""
        raise UserError(f"task: {', '.join(sources)} holds no labelled example{why}")
    return out


def _example(record: Any, cfg: TaskConfig, where: str) -> Example:
    try:
        text = readers.text_field_value(record, cfg.text_field, where)
    except UserError as e:  # the reader's hint names the corpus's setting
        raise UserError(str(e).replace("data.text_field", "task.text_field")) from None
    if not text:
        raise UserError(f"{where}: empty '{cfg.text_field}'; remove the record or fill it in")
    if cfg.label_field not in record or record[cfg.label_field] in (None, ""):
        fields = ", ".join(sorted(map(str, record)))
        raise UserError(f"{where}: no label '{cfg.label_field}' (fields: {fields}); set task.label_field")
    return Example(text, str(record[cfg.label_field]), where)


def _rank(example: Example, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}|{example.text}".encode(), digest_size=8).digest(), "big")


def stratified_split(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of each label's examples (by hash order: deterministic)."""
    train, test = [], []
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    for label, group in sorted(by_label.items()):
        ordered = sorted(group, key=lambda e: _rank(e, label))
        n_test = round(len(group) * fraction)
        if len(group) >= 2:
            n_test = min(max(n_test, 1), len(group) - 1)  # every label on both sides when possible
        test += ordered[:n_test]
        train += ordered[n_test:]
    return train, test


def subsample(examples: list[Example], n: int) -> list[Example]:
    """At most ``n`` examples, each label keeping its share (deterministic)."""
    if len(examples) <= n:
        return examples
    kept, _ = stratified_split(examples, 1 - n / len(examples))
    return kept


def check_labels(train: list[Example], test: list[Example]) -> list[str]:
    """The label set (sorted); a test label that training never saw is an error."""
    seen = {e.label for e in train}
    for e in test:
        if e.label not in seen:
            raise UserError(
                f"{e.where}: label '{e.label}' never occurs in the training examples "
                f"(training labels: {', '.join(sorted(seen))})"
            )
    return sorted(seen)


def class_report(train: list[Example], test: list[Example]) -> dict[str, Any]:
    """Class counts, and the imbalance a user should know about."""
    train_counts = Counter(e.label for e in train)
    test_counts = Counter(e.label for e in test)
    majority = test_counts.most_common(1)[0][1] / len(test) if test else None
    return {
        "train_counts": dict(sorted(train_counts.items())),
        "test_counts": dict(sorted(test_counts.items())),
        "majority_class_accuracy": majority,
        "imbalance_ratio": max(train_counts.values()) / min(train_counts.values()),
    }


@dataclass
class Encoded:
    """Tokenized examples: token id lists and label indices."""

    ids: list[list[int]]
    labels: torch.Tensor


def encode(examples: list[Example], tokenizer: Any, labels: list[str], max_len: int) -> Encoded:
    """Tokenize (with the tokenizer's special tokens, truncated to ``max_len``)."""
    out = tokenizer([e.text for e in examples], truncation=True, max_length=max_len)
    index = {label: i for i, label in enumerate(labels)}
    return Encoded([list(x) for x in out["input_ids"]], torch.tensor([index[e.label] for e in examples]))


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), each (batch, max_len)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids, mask


def batches(data: Encoded, batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled training batches (reshuffled every epoch with ``seed``)."""
    epoch = 0
    while True:
        order = epoch_order(len(data.ids), seed, epoch)
        # Full batches only (a short last batch would get a noisier step), unless one is all there is.
        for i in range(0, max(1, len(order) - batch_size + 1), batch_size):
            rows = order[i : i + batch_size].tolist()
            input_ids, mask = pad_batch([data.ids[r] for r in rows], pad_id)
            yield {"input_ids": input_ids, "attention_mask": mask, "labels": data.labels[rows]}
        epoch += 1
