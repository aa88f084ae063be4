"""How much memory a recipe needs, from its shapes: what stays (weights, gradients, optimizer
state) and what grows with each block row of a micro-batch (activations kept for the backward
pass). Used to choose a micro-batch that fills a GPU before the first step, which then checks
the estimate (an out-of-memory error halves the micro-batch, see :mod:`ecoadapt.train.loop`).
"""

from __future__ import annotations

from typing import Any

import torch

# Values kept for the backward pass per token and layer, in units of the hidden size, besides
# the MLP's intermediate activations: the block input, the two norms' outputs, Q, K, V, the
# attention output and projection, the residuals (Korthikanti et al. 2022 count 34 bytes per
# token per hidden unit in 16 bits with dropout masks; without dropout about 10 values).
# Attention through SDPA's fused kernels keeps no (sequence x sequence) matrix.
KEPT_PER_HIDDEN = 10
# The MLP keeps its up and gate projections, the activation and their product: four values
# per intermediate unit (SwiGLU; a GELU MLP keeps two, so this errs on the safe side).
KEPT_PER_INTERMEDIATE = 4


# bitsandbytes keeps 32-bit states for tensors smaller than this (its min_8bit_size).
MIN_8BIT_VALUES = 4096


def static_bytes(model: torch.nn.Module, policy: Any, optimizer: str = "adamw") -> dict[str, int]:
    """Weights, gradients and AdamW state (bytes) of the model as the recipe stores it.

    Weights count as stored: a quantized base's packed codes at their own size (4-bit NF4 is
    half a byte per value), fp32 masters beside 16-bit weights. ``optimizer``: train.optimizer;
    the 8-bit kinds keep two 1-byte moments per value (plus one fp32 scale per 256) in tensors
    of 4,096 values or more.
    """
    params = list(model.parameters())
    masters = {id(p): m for p, m in getattr(policy, "masters", [])}
    weights = sum(p.numel() * p.element_size() for p in params) + sum(m.numel() * 4 for m in masters.values())
    trainable = [p for p in params if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    gradients += sum(masters[id(p)].numel() * 4 for p in trainable if id(p) in masters)
    # Two moments per trained value, in the dtype of what the optimizer updates (the fp32 master
    # where there is one).
    states = sum(_moments_bytes(p, 4 if id(p) in masters else p.element_size(), optimizer) for p in trainable)
    return {"weights": weights, "gradients": gradients, "optimizer": states}


def _moments_bytes(p: torch.Tensor, value_bytes: int, optimizer: str) -> int:
    return moments_bytes(p.numel(), value_bytes, optimizer)


def moments_bytes(values: int, value_bytes: int, optimizer: str) -> int:
    """Bytes of AdamW's two moments for one tensor of ``values`` values (``value_bytes`` each in
    full precision; 1 byte each plus an fp32 scale per 256 for the 8-bit kinds, from 4,096 on)."""
    if optimizer == "adamw" or values < MIN_8BIT_VALUES:
        return 2 * values * value_bytes
    return 2 * (values + 4 * -(-values // 256))


def activation_bytes_per_row(
    config: Any, seq_len: int, bytes_per_value: int, checkpointing: bool, residual_bytes: int | None = None
) -> int:
    """Bytes of activations one block row (``seq_len`` tokens) keeps for the backward pass.

    Args:
        config: the model's transformers config (hidden_size, num_hidden_layers,
            intermediate_size; absent fields fall back to BERT's proportions).
        seq_len: tokens per block.
        bytes_per_value: 2 when the forward pass computes in 16 bits, 4 in fp32.
        checkpointing: train.gradient_checkpointing: each layer keeps only its input, and one
            layer's activations are recomputed at a time.
        residual_bytes: bytes per value of the residual stream, the input each checkpointed
            layer keeps: 4 under autocast, whose residual stream stays fp32 (even over a 16-bit
            base, :meth:`ecoadapt.model.precision.Policy.keep_residual_fp32`); default
            ``bytes_per_value``.

    Returns:
        An estimate that errs high (frozen lower blocks keep nothing, which is not counted).
    """
    hidden = int(getattr(config, "hidden_size", 768))
    layers = int(getattr(config, "num_hidden_layers", 12))
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    per_layer = KEPT_PER_HIDDEN * hidden + KEPT_PER_INTERMEDIATE * intermediate
    if not checkpointing:
        return layers * per_layer * seq_len * bytes_per_value
    kept_inputs = layers * hidden * seq_len * (residual_bytes or bytes_per_value)
    return kept_inputs + per_layer * seq_len * bytes_per_value
