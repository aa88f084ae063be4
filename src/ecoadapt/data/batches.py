"""Micro-batches from token blocks: shuffling, masked-LM masking, labels.

Masking draws from an explicit ``torch.Generator`` rather than the global RNG (as the Hugging
Face collator does), so that a run's masks depend on its seed alone: the same data order and
masks whatever else consumed random numbers (dropout, newly initialised weights).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ecoadapt.config import MLM_PROBABILITY

IGNORE = -100  # label value that cross-entropy ignores
# Epoch e of seed s is shuffled by the generator seeded s x EPOCHS_PER_SEED + e: distinct streams
# for every (seed, epoch) below this many epochs, the same order on every machine.
EPOCHS_PER_SEED = 1000
# The masking generator is seeded apart from the shuffling one (seed + this), so the two
# streams never coincide, whatever the seed.
MASK_SEED_OFFSET = 1


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``n`` items in ``epoch`` of a run seeded ``seed`` (a permutation, (n,))."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCHS_PER_SEED + epoch))


# Blocks are shuffled in windows of this many (8 M tokens of 128-token blocks): the order of the
# windows is shuffled, then the blocks within each, so an epoch's order takes memory for one
# window, not for the whole corpus. A corpus of one window is shuffled whole.
ORDER_WINDOW = 2**16
WINDOW_SEED_STRIDE = 1_000_003  # a prime: distinct generator seeds for every (epoch, window)


class EpochOrder:
    """The order of ``n`` blocks in one epoch, produced a window at a time.

    Indexing by a slice of positions returns the block indices at those positions (int64).
    """

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n = n
        self.base_seed = seed * EPOCHS_PER_SEED + epoch
        windows = max(1, -(-n // ORDER_WINDOW))
        order = epoch_order(windows, seed, epoch) if windows > 1 else torch.zeros(1, dtype=torch.long)
        self.windows = order.tolist()  # the windows in visiting order (n / 65,536 of them)
        sizes = [min(ORDER_WINDOW, n - w * ORDER_WINDOW) for w in self.windows]
        self.starts = [0, *itertools.accumulate(sizes)][:-1]  # each window's first position
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def _window(self, k: int) -> torch.Tensor:
        """The block indices of the k-th window visited, shuffled."""
        if self._cached is None or self._cached[0] != k:
            w = self.windows[k]
            size = min(ORDER_WINDOW, self.n - w * ORDER_WINDOW)
            if len(self.windows) == 1:
                perm = torch.randperm(size, generator=torch.Generator().manual_seed(self.base_seed))
            else:
                seed = (self.base_seed * WINDOW_SEED_STRIDE + w) % 2**63
                perm = w * ORDER_WINDOW + torch.randperm(size, generator=torch.Generator().manual_seed(seed))
            self._cached = (k, perm)
        return self._cached[1]

    def __getitem__(self, positions: slice) -> torch.Tensor:
        start, stop, _ = positions.indices(self.n)
        pieces = []
        while start < stop:
            k = bisect.bisect_right(self.starts, start) - 1
            offset = start - self.starts[k]
            window = self._window(k)
            piece = window[offset : offset + (stop - start)]
            pieces.append(piece)
            start += len(piece)
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM targets aligned with the positions that predict them: position t's target is
    token t+1; the last position has none (IGNORE).

    Shifting the labels, not the logits: slicing (batch, seq, vocab) logits makes every later
    reshape copy the largest tensor of the step.

    Args:
        labels: (batch, seq) int64.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


class Blocks(Protocol):
    """Token blocks: a (n, seq) tensor, or a memory-mapped store's blocks, indexed alike."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


@dataclass
class MaskSpec:
    """What masked-LM masking needs from the tokenizer."""

    mask_id: int
    vocab_size: int
    special_ids: list[int]
    probability: float = MLM_PROBABILITY


def mask_tokens(ids: torch.Tensor, spec: MaskSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the non-special tokens as targets; of those 80%
    become [MASK], 10% a random token, 10% stay.

    Args:
        ids: int64 (batch, seq) token ids.
        spec: mask token, vocabulary size, special token ids (never chosen).
        generator: the source of randomness.

    Returns:
        (inputs, labels), both (batch, seq); labels are IGNORE where no target.
    """
    labels = ids.clone()
    chosen = torch.rand(ids.shape, generator=generator) < spec.probability
    chosen &= ~torch.isin(ids, torch.tensor(spec.special_ids, dtype=ids.dtype))
    labels[~chosen] = IGNORE
    inputs = ids.clone()
    draw = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (draw < 0.8)
    to_random = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[to_mask] = spec.mask_id
    random_ids = torch.randint(spec.vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


def make_batch(
    blocks: torch.Tensor, objective: str, mask: MaskSpec | None, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Inputs and labels for one micro-batch of packed blocks (no padding, so no attention mask).

    For causal LM the labels are the inputs (the loss shifts them); for masked LM they are the
    masked targets.
    """
    if objective == "mlm":
        assert mask is not None, "masked LM needs a MaskSpec"
        inputs, labels = mask_tokens(blocks, mask, generator)
        return {"input_ids": inputs, "labels": labels}
    return {"input_ids": blocks, "labels": blocks.clone()}


def target_count(labels: torch.Tensor, objective: str) -> int:
    """Targets the loss is computed on: tokens (causal LM predicts positions 1..n-1; masked LM
    the masked ones), or examples for classification ("cls")."""
    if objective == "cls":
        return int(labels.numel())
    if objective == "clm":
        return int((shift_labels(labels) != IGNORE).sum())
    return int((labels != IGNORE).sum())


class BlockLoader:
    """Endless micro-batches of training blocks, reshuffled every epoch with the run's seed.

    Under data parallelism every rank draws the same *global* micro-batch (``micro_batch_size
    x world`` blocks, masked with the same generator) and keeps its own slice of rows: the
    shards are disjoint and deterministic, the masks are those a single process would draw,
    and ``global_targets`` (the whole micro-batch's target count) needs no communication.

    Attributes:
        epoch: completed passes (plus the fraction of the current one in ``position``).
        position: index of the next block within the current epoch's order.
    """

    def __init__(
        self,
        blocks: Blocks,
        micro_batch_size: int,
        objective: str,
        mask: MaskSpec | None,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world = world
        self.objective = objective
        self.mask = mask
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)
        self._masks = torch.Generator().manual_seed(seed + MASK_SEED_OFFSET)

    def _permutation(self, epoch: int) -> EpochOrder:
        return EpochOrder(len(self.blocks), self.seed, epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows: list[torch.Tensor] = []
        needed = self.micro_batch_size * self.world
        while needed > 0:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(needed, len(self._order) - self.position)
            rows.append(self._order[self.position : self.position + take])
            self.position += take
            needed -= take
        index = torch.cat(rows)
        batch = make_batch(self.blocks[index], self.objective, self.mask, self._masks)
        if self.world == 1:
            return batch
        mine = slice(self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size)
        out = {k: v[mine] for k, v in batch.items()}
        out["global_targets"] = torch.tensor(target_count(batch["labels"], self.objective))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is (the epoch's order is rebuilt from the seed and epoch)."""
        return {"epoch": self.epoch, "position": self.position, "masks": self._masks.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the same blocks and masks come next."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)
        self._masks.set_state(state["masks"])

    @property
    def epochs_done(self) -> float:
        """Passes over the training blocks so far (fractional)."""
        return self.epoch + self.position / max(1, len(self._order))
