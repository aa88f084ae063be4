"""Layer-wise precision: a dtype per module, given as a map or searched by sensitivity.

A map ``{pattern: dtype}`` (glob patterns over qualified module names, later entries winning
over earlier ones) stores each matched module's weights in its dtype and runs its forward pass
in it: floating inputs are cast to the module's dtype and autocast is switched off inside, so
"this block in bf16, its norms in fp32" means exactly that, whatever the global mode.

``auto`` measures, on a few calibration batches, how much the held-out loss moves when each
transformer block alone computes in the lower dtype, then lowers the least sensitive blocks
one by one while the summed predicted change stays within ``precision.tolerance`` (relative to
the fp32 loss). The cost is (blocks + 1) forward passes per calibration batch, no backward.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ecoadapt.core.errors import UserError
from ecoadapt.model.precision import DTYPES


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def set_module_precision(module: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """Store ``module``'s weights in ``dtype`` and run its computation in it.

    Every submodule that owns parameters (Linear, norm, embedding) gets its weights converted in
    place (the Parameter objects stay the same, so tied weights stay tied) and its forward
    wrapped: floating inputs are cast to ``dtype`` and autocast is off inside. Wrapping each
    leaf keeps nested maps consistent: a block in bf16 whose norms are in fp32 feeds each of
    its Linear layers bf16 inputs whatever the norm returned.
    """
    for leaf in module.modules():
        if not _owns_parameters(leaf):
            continue
        for p in leaf.parameters(recurse=False):
            p.data = p.data.to(dtype)
        _wrap_forward(leaf, dtype, device_type)
    # The matched module itself casts what it is handed too: a block receives position
    # embeddings (rotary cos/sin) computed outside it, which would otherwise promote its
    # queries and keys back to fp32 while its values stay in the lower dtype.
    _wrap_forward(module, dtype, device_type)


def _wrap_forward(module: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    # Kept in the instance dict so that re-applying wraps the original, never a wrapper.
    original = module.__dict__.setdefault("_ecoadapt_forward", module.forward)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, enabled=False):
            return original(*_cast(args, dtype), **_cast(kwargs, dtype))

    module.forward = forward


def clear_module_precision(module: nn.Module) -> None:
    """Undo :func:`set_module_precision`'s forward wrappers (weights keep their dtype)."""
    for leaf in module.modules():
        original = leaf.__dict__.pop("_ecoadapt_forward", None)
        if original is not None:
            leaf.forward = original


def apply_map(
    model: nn.Module, mapping: dict[str, str], device_type: str, default: torch.dtype | None = None
) -> dict[str, str]:
    """Apply ``{pattern: dtype}`` to the model's modules, in map order.

    Args:
        default: when the run has no autocast, the dtype every other module keeps; they are
            wrapped too, so that each casts what it receives from a module of another dtype.
            Under autocast (None), autocast itself reconciles the dtypes of other modules.

    Returns:
        {module name: dtype name} for every module a pattern matched (the last match wins).

    Raises:
        UserError: a pattern that matches no module, or an unknown dtype.
    """
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    applied: dict[str, str] = {}
    if default is not None:
        set_module_precision(model, default, device_type)
    for pattern, dtype_name in mapping.items():
        if dtype_name not in DTYPES:
            raise UserError(f"precision.layers: '{pattern}: {dtype_name}': dtype must be one of {', '.join(DTYPES)}")
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            close = [n for n in names if pattern.strip("*").split(".")[-1] in n][:3]
            hint = f" (modules like: {', '.join(close)})" if close else f" (modules like: {', '.join(names[:3])})"
            raise UserError(f"precision.layers: pattern '{pattern}' matches no module of this model{hint}")
        for name in matched:
            set_module_precision(modules[name], DTYPES[dtype_name], device_type)
            applied[name] = dtype_name
    return applied


def effective_dtypes(model: nn.Module) -> dict[str, str]:
    """The stored dtype of every module that owns parameters directly, by qualified name."""
    out = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            out[name] = str(own[0].dtype).replace("torch.", "")
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters as stored now (shared tensors once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class SearchResult:
    """What ``precision.layers: auto`` found.

    Attributes:
        base_loss: calibration loss with every block in fp32.
        sensitivity: per block, the relative loss change with that block alone lowered.
        chosen: {block name: dtype name}.
        predicted_change: the summed relative change of the lowered blocks.
        predicted_weight_saving_bytes: weight memory saved by storing the lowered blocks.
        seconds: time the search took.
    """

    base_loss: float
    sensitivity: dict[str, float]
    chosen: dict[str, str]
    predicted_change: float
    predicted_weight_saving_bytes: int
    seconds: float
    table: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def search(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    loss_fn: Callable[[], float],
    low: str,
    tolerance: float,
    device_type: str,
    default: torch.dtype | None = None,
) -> SearchResult:
    """Choose a dtype per block: the cheapest that keeps the loss within ``tolerance``.

    Args:
        model: the model (fp32).
        blocks_name: qualified name of the block list.
        blocks: the blocks.
        loss_fn: the calibration loss of the model as it is now (a few fixed batches).
        low: the lower dtype to try ("bf16" or "fp16").
        tolerance: allowed relative increase of the calibration loss, summed over blocks.
        device_type: "cpu" or "cuda".
        default: without autocast, the dtype of the other modules (they cast what a lowered
            block hands them, as in :func:`apply_map`); None under autocast.
    """
    start = time.perf_counter()
    if default is not None:
        set_module_precision(model, default, device_type)
    was_training = model.training
    model.eval()
    base = loss_fn()
    sensitivity: dict[str, float] = {}
    for i, block in enumerate(blocks):
        name = f"{blocks_name}.{i}"
        saved = {k: v.detach().clone() for k, v in block.state_dict().items()}
        set_module_precision(block, DTYPES[low], device_type)
        sensitivity[name] = abs(loss_fn() - base) / max(abs(base), 1e-12)
        clear_module_precision(block)
        for p in block.parameters():
            p.data = p.data.float()
        block.load_state_dict(saved)  # exact fp32 weights back, not the rounded ones
        if default is not None:
            set_module_precision(block, default, device_type)
    chosen: dict[str, str] = {}
    total = 0.0
    for name, change in sorted(sensitivity.items(), key=lambda kv: kv[1]):
        if total + change <= tolerance:
            chosen[name] = low
            total += change
    per_block = {f"{blocks_name}.{i}": sum(p.numel() for p in b.parameters()) for i, b in enumerate(blocks)}
    saving = sum(per_block[n] * (4 - DTYPES[low].itemsize) for n in chosen)
    table = [{"block": n, "relative_loss_change": sensitivity[n], "dtype": chosen.get(n, "fp32")} for n in sensitivity]
    clear_module_precision(model)  # as found: apply_map wraps what the search chose
    model.train(was_training)
    return SearchResult(base, sensitivity, chosen, total, saving, time.perf_counter() - start, table)
