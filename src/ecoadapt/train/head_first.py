"""train.head_first_steps: a newly initialised head trained alone before the whole recipe, so
that a random head does not drag the pretrained body at the start (the body frozen: the
backward pass stops at the head, so these steps are cheap)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ecoadapt.config import RunConfig
from ecoadapt.data.batches import BlockLoader
from ecoadapt.model.adapters import is_new
from ecoadapt.train.loop import Loop, fit
from ecoadapt.train.prepare import Prepared

HEAD_SEED_OFFSET = 7919  # the head-first steps draw their own block order and masks


def train_head(cfg: RunConfig, p: Prepared, device: torch.device, log: Callable[[str], None]) -> dict[str, Any] | None:
    """train.head_first_steps on the newly initialised parameters alone (the rest frozen);
    what they did (steps, tokens, time_s, train_loss), or None when there is nothing to do."""
    steps, new = cfg.train.head_first_steps, p.loaded.fresh
    if not steps or not new:
        return None
    frozen = [q for name, q in p.recipe.model.named_parameters() if q.requires_grad and not is_new(name, new)]
    log(f"head first: {steps} steps on the new head alone ({', '.join(sorted({n.rsplit('.', 1)[0] for n in new}))})")
    for q in frozen:
        q.requires_grad_(False)
    try:
        torch.manual_seed(cfg.train.seed + HEAD_SEED_OFFSET)
        loader = BlockLoader(
            p.blocks.train, cfg.train.micro_batch_size, p.loaded.objective, p.recipe.mask,
            cfg.train.seed + HEAD_SEED_OFFSET, 0, 1,
        )  # fmt: skip
        head_cfg = replace(cfg.train, max_steps=steps, body_lr_scale=1.0, log_every=steps)
        loop = Loop.create(p.recipe.model, steps, head_cfg, p.recipe.policy, p.loaded.objective, device)
        result = fit(loop, loader)
    finally:
        for q in frozen:
            q.requires_grad_(True)
    log(f"head first: loss {result.train_loss:.4f} after {steps} steps, {result.time_s:.1f} s")
    return {"steps": steps, "tokens": result.tokens, "time_s": result.time_s, "train_loss": result.train_loss}
