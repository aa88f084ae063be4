"""Held-out evaluation of the language-modelling objective: loss, perplexity, token accuracy."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ecoadapt.data.batches import IGNORE, MaskSpec, make_batch, shift_labels
from ecoadapt.losses import forward_logits, loss_sum
from ecoadapt.precision import Policy

EVAL_MASK_SEED = 1234  # the same masks before and after training, so the losses compare


@torch.no_grad()
def heldout(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    objective: str,
    mask: MaskSpec | None,
    batch_size: int,
    policy: Policy,
    device: torch.device,
) -> dict[str, Any]:
    """Mean loss per target token on held-out blocks.

    Args:
        blocks: int64 (n, seq) held-out token blocks.
        objective: "clm" or "mlm" (masked with a fixed seed, so runs compare).
        mask: masking spec for mlm.
        batch_size: blocks per forward pass.
        policy: precision of the forward pass (the same as training's).
        device: where the model lives.

    Returns:
        {"loss", "perplexity", "accuracy" (of the arg-max prediction on target tokens),
        "target_tokens", "time_s"}. Perplexity is exp(loss); for masked LM it is the
        pseudo-perplexity of the masked tokens.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    targets = 0
    start = time.perf_counter()
    for i in range(0, len(blocks), batch_size):
        batch = make_batch(blocks[i : i + batch_size], objective, mask, generator)
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        with policy.autocast():
            logits, labels = forward_logits(model, input_ids, labels, objective)
        total += loss_sum(logits, labels, objective).double()
        if objective == "clm" and logits.ndim == 3:
            labels = shift_labels(labels)
        keep = labels != IGNORE
        correct += (logits.argmax(-1)[keep] == labels[keep]).sum()
        targets += int(keep.sum())
    model.train(was_training)
    loss = total.item() / max(targets, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": correct.item() / max(targets, 1),
        "target_tokens": targets,
        "time_s": time.perf_counter() - start,
    }
