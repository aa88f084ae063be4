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
    """

    loss: float
    perplexity: float
    accuracy: float
    target_tokens: int
    time_s: float
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        """Plain data (what a checkpoint keeps)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeldOut:
        """Read back what :meth:`as_dict` wrote (a checkpoint's ``before``)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


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
        The loss, perplexity, accuracy, target tokens, seconds and the batch size that fit.
    """
    module = as_loss_module(model, objective)
    was_training = module.training
    module.eval()
    start = time.perf_counter()
    while True:
        try:
            total, correct, targets = _sums(module, blocks, objective, mask, batch_size, policy, device)
            break
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or batch_size == 1:
                raise
            # All blocks again in batches half as large (masked LM draws its masks per batch: the
            # result's batch_size says which were used).
            batch_size //= 2
    module.train(was_training)
    # .item() is a device-host sync: once per evaluation.
    n_targets = int(targets.item())
    mean = total.item() / max(n_targets, 1)
    return HeldOut(
        loss=mean,
        perplexity=math.exp(min(mean, 700.0)),
        accuracy=correct.item() / max(n_targets, 1),
        target_tokens=n_targets,
        time_s=time.perf_counter() - start,
        batch_size=batch_size,
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
    """Summed loss, correct predictions and target tokens over every block, on the device (no sync)."""
    generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    targets = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(blocks), batch_size):
        batch = make_batch(blocks[i : i + batch_size], objective, mask, generator)
        with policy.autocast():
            loss, hits, n = module(batch["input_ids"].to(device), batch["labels"].to(device), scores=True)
        total += loss.double()
        correct += hits
        targets += n
    return total, correct, targets
