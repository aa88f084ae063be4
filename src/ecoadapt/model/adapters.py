"""What trains: all weights, the top k blocks, or LoRA adapters (on all or the top k blocks).

Freezing the lower blocks is the cheapest lever on small hardware: when nothing below block
``n - k`` requires a gradient, autograd never builds the backward pass for it, so those blocks
cost a forward pass only. A tied LM head (sharing the input embedding matrix) stays frozen in
that case, because training it would make the embedding output require a gradient and pull the
backward pass through every block.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ecoadapt.config import LoraConfig, TrainConfig
from ecoadapt.core.errors import UserError
from ecoadapt.model.pretrained import LoadedModel, tied_parameter_names, transformer_blocks


@dataclass
class TrainablePlan:
    """What was made trainable, for the summary.

    Attributes:
        blocks: indices of the blocks that train (all of them unless train.trainable_layers).
        n_blocks: blocks in the model.
        lora: whether LoRA adapters were added.
        extra_trainable: modules trained in full besides the blocks (newly initialised heads).
    """

    blocks: list[int]
    n_blocks: int
    lora: bool
    extra_trainable: list[str] = field(default_factory=list)


PEFT_COPY = ".modules_to_save.default"  # where PEFT keeps the trained copy of a module it saves in full


def is_new(name: str, new: Collection[str]) -> bool:
    """Whether parameter ``name`` (of a model however wrapped: LossModule, DDP, PEFT) is one of
    the newly initialised parameters ``new`` (names in the bare model)."""
    bare = name.replace(PEFT_COPY, "")
    return any(bare == n or bare.endswith("." + n) for n in new)


def modules_after_blocks(model: nn.Module, blocks_name: str, example: torch.Tensor) -> list[str]:
    """Leaf modules that run after the last block (final norm, LM head), in call order.

    Found by running one forward pass with hooks, so it works for any architecture.
    """
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: order.append(n)))
    try:
        with torch.no_grad():
            model(input_ids=example)
    finally:
        for h in handles:
            h.remove()
    last_block = max(i for i, n in enumerate(order) if n.startswith(blocks_name + "."))
    return list(dict.fromkeys(n for n in order[last_block + 1 :] if not n.startswith(blocks_name + ".")))


def _owner(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _drop_input_grad_hooks(model: torch.nn.Module) -> None:
    """Remove the forward hooks ``enable_input_require_grads`` put on the input embeddings.

    ``disable_input_require_grads()`` alone is not enough: PEFT may enable them more than once,
    and transformers keeps the handles of the last call only.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        return
    for key, hook in list(embeddings._forward_hooks.items()):
        if "enable_input_require_grads" in getattr(hook, "__qualname__", ""):
            del embeddings._forward_hooks[key]


def prepare(loaded: LoadedModel, train: TrainConfig, lora: LoraConfig) -> tuple[Any, TrainablePlan]:
    """Freeze, unfreeze and wrap the model as the config says; return the model to train.

    Raises:
        UserError: train.trainable_layers above the number of blocks, or LoRA targets that match
            no module.
    """
    model = loaded.model
    blocks_name, blocks = transformer_blocks(model)
    n = len(blocks)
    if train.trainable_layers == "all":
        chosen = list(range(n))
    else:
        if train.trainable_layers > n:
            raise UserError(f"train.trainable_layers = {train.trainable_layers}: this model has only {n} blocks")
        chosen = list(range(n - train.trainable_layers, n))
    fresh_modules = sorted({_owner(p) for p in loaded.fresh})

    if train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA, frozen lower blocks)
        # without the enable_input_require_grads work-around the reentrant variant needs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    if lora.enabled:
        wrapped, plan = _with_lora(model, lora, blocks_name, chosen, n, fresh_modules)
        if train.gradient_checkpointing:
            # PEFT makes the embeddings' output require grad, for reentrant checkpointing; the
            # non-reentrant kind used here does not need it, and with it the backward pass runs
            # through every frozen block below the adapters (measured on MiniLM with
            # train.trainable_layers 3 of 6: twice the step time).
            _drop_input_grad_hooks(model)
        return wrapped, plan

    extra: list[str] = []
    if len(chosen) < n:
        tied = tied_parameter_names(model)
        model.requires_grad_(False)
        for i in chosen:
            blocks[i].requires_grad_(True)
        example = torch.zeros((1, 8), dtype=torch.long)
        above = set(modules_after_blocks(model, blocks_name, example)) | set(fresh_modules)
        for name, p in model.named_parameters():
            if _owner(name) in above and name not in tied:
                p.requires_grad_(True)
                extra.append(_owner(name))
    return model, TrainablePlan(chosen, n, False, sorted(set(extra)))


def _with_lora(
    model: Any, cfg: LoraConfig, blocks_name: str, chosen: list[int], n: int, fresh: list[str]
) -> tuple[Any, TrainablePlan]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    kwargs: dict[str, Any] = {}
    if len(chosen) < n:
        kwargs["layers_to_transform"] = chosen
        kwargs["layers_pattern"] = blocks_name.rsplit(".", 1)[-1]
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        # A newly initialised head is random: it must train in full, and PEFT saves it with
        # the adapter so that the adapter loads into the same base model again.
        modules_to_save=fresh or None,
        **kwargs,
    )
    try:
        wrapped = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise UserError(f"lora.target_modules: {e}; name modules of this model (see its named_modules)") from None
    return wrapped, TrainablePlan(chosen, n, True, fresh)
