"""Held-out evaluation of the language-modelling objective: loss, perplexity, token accuracy."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ecoadapt.data.batches import Blocks, MaskSpec, make_batch
from ecoadapt.model.losses import as_loss_module
from ecoadapt.model.precision import Policy
from ecoadapt.train.micro_batch import is_out_of_memory

EVAL_MASK_SEED = 1234  # the same masks before and after training, so the losses compare


@dataclass(frozen=True)
class HeldOut:
    """One held-out evaluation.

    Attributes:
        loss: mean loss per target token (nats).
        perplexity: exp(loss); for masked LM the pseudo-perplexity of the masked tokens.
        accuracy: share of target tokens whose arg-max prediction is right.
        target_tokens: tokens scored.
        time_s: seconds it took.
        batch_size: blocks per forward pass that fit (halved on out of memory).
        batch_losses: each batch's mean loss per target token, in order: two evaluations of the
            same blocks at the same batch size pair batch by batch.
        general: the general text's evaluation in the same window (data.general_eval), or None.
    """

    loss: float
    perplexity: float
    accuracy: float
    target_tokens: int
    time_s: float
    batch_size: int
    batch_losses: tuple[float, ...] = ()
    general: HeldOut | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (what a checkpoint keeps)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeldOut:
        """Read back what :meth:`as_dict` wrote (a checkpoint's ``before``; one written before
        batch losses and the general text has neither)."""
        general = data.get("general")
        return cls(
            **{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name not in ("batch_losses", "general")},
            batch_losses=tuple(data.get("batch_losses", ())),
            general=cls.from_dict(general) if general is not None else None,
        )

    def with_general(self, general: HeldOut | None) -> HeldOut:
        """This evaluation with the general text's beside it."""
        return dataclasses.replace(self, general=general)


@torch.no_grad()
def heldout(
    model: torch.nn.Module,
    blocks: Blocks,
    objective: str,
    mask: MaskSpec | None,
    batch_size: int,
    policy: Policy,
    device: torch.device,
) -> HeldOut:
    """Mean loss per target token on held-out blocks.

    Args:
        model: the model, or its :class:`~ecoadapt.model.losses.LossModule` (DDP/FSDP-wrapped or not).
        blocks: int64 (n, seq) held-out token blocks.
        objective: "clm" or "mlm" (masked with a fixed seed, so runs compare).
        mask: masking spec for mlm.
        batch_size: blocks per forward pass; halved (and the batch retried) on out of memory.
        policy: precision of the forward pass (the same as training's).
        device: where the model lives.

    Returns:
        The loss, perplexity, accuracy, target tokens, seconds, the batch size that fit and each
        batch's loss.
    """
    module = as_loss_module(model, objective)
    was_training = module.training
    module.eval()
    start = time.perf_counter()
    while True:
        try:
            losses, correct, targets = _sums(module, blocks, objective, mask, batch_size, policy, device)
            break
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or batch_size == 1:
                raise
            # All blocks again in batches half as large (masked LM draws its masks per batch: the
            # result's batch_size says which were used).
            batch_size //= 2
    module.train(was_training)
    # .tolist() and .item() are device-host syncs: once per evaluation.
    per_batch = losses.cpu().tolist()
    counts = targets.cpu().tolist()
    n_targets = int(sum(counts))
    mean = sum(per_batch) / max(n_targets, 1)
    return HeldOut(
        loss=mean,
        perplexity=math.exp(min(mean, 700.0)),
        accuracy=correct.item() / max(n_targets, 1),
        target_tokens=n_targets,
        time_s=time.perf_counter() - start,
        batch_size=batch_size,
        batch_losses=tuple(total / n for total, n in zip(per_batch, counts, strict=True) if n),
    )


def _sums(
    module: torch.nn.Module,
    blocks: Blocks,
    objective: str,
    mask: MaskSpec | None,
    batch_size: int,
    policy: Policy,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each batch's summed loss (float64) and target tokens, and the correct predictions over
    every block, on the device (no sync)."""
    generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
    totals, counts = [], []
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(blocks), batch_size):
        batch = make_batch(blocks[i : i + batch_size], objective, mask, generator)
        with policy.autocast():
            loss, hits, n = module(batch["input_ids"].to(device), batch["labels"].to(device), scores=True)
        totals.append(loss.double())
        counts.append(n)
        correct += hits
    if not totals:
        return torch.zeros(0, dtype=torch.float64), correct, torch.zeros(0, dtype=torch.long)
    return torch.stack(totals), correct, torch.stack(counts)
