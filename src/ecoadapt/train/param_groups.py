"""AdamW parameter groups: weight decay by tensor rank, learning rate by pretrained or new."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from ecoadapt.model.adapters import is_new


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, new: Collection[str] = (), body_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors); pretrained
    weights at ``lr * body_lr_scale``, newly initialised ones (``new``: names in the unwrapped
    model, see :func:`ecoadapt.model.adapters.is_new`) at ``lr``."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            fresh = body_lr_scale != 1.0 and is_new(name, new)
            groups.setdefault((p.ndim >= 2, fresh), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr if fresh else lr * body_lr_scale}
        for (decays, fresh), params in sorted(groups.items(), reverse=True)
    ]


def adamw(groups: list[dict[str, Any]], lr: float, kind: str = "adamw") -> torch.optim.Optimizer:
    """The run's AdamW (train.optimizer).

    ``adamw``: torch's, with its fused kernel (one launch for every parameter's update on a GPU;
    3.6x faster than the foreach kernels on this CPU for 20M parameters, BENCHMARKS.md), or the
    foreach kernels where the parameters' device or dtype has no fused kernel. ``adamw8bit`` and
    ``paged_adamw8bit``: bitsandbytes', whose two moments are stored in 8 bits with block-wise
    scales (tensors under 4,096 values keep 32-bit states, as bitsandbytes decides).
    """
    if kind != "adamw":
        from ecoadapt.model.quantize import bitsandbytes

        bnb = bitsandbytes()
        eight_bit = bnb.optim.PagedAdamW8bit if kind == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return eight_bit(groups, lr=lr)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
