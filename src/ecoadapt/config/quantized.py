"""Which settings a quantized frozen base (lora.quantize) and the 8-bit optimizer work with.

Each refusal names the key and what to do instead, when the configuration is read, so that no
run starts that would fail later or silently do something else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def check(cfg: Any, need: Callable[[bool, str, str], None]) -> None:
    """``cfg``: the RunConfig (not imported: it imports this module); ``need(ok, key, what)``."""
    kind = cfg.lora.quantize
    if kind is not None:
        need(
            cfg.lora.enabled,
            "lora.quantize",
            "a quantized base is frozen, so something must train on top of it: set lora.enabled: true",
        )
        need(
            not cfg.lora.merge,
            "lora.merge",
            "merging into a quantized base rounds the adapter away; with lora.quantize leave it false and "
            "merge the saved adapter into the full-precision base (PEFT's merge_and_unload)",
        )
        need(
            cfg.precision.layers is None,
            "precision.layers",
            "the quantized Linears compute in the run's precision; layer maps cannot set their dtype. "
            "Use null with lora.quantize",
        )
        need(
            cfg.train.compile in ("auto", False),
            "train.compile",
            "bitsandbytes' quantized matmuls are not compiled by torch.compile; use false (auto is off) with "
            "lora.quantize",
        )
        need(
            cfg.parallel.strategy != "fsdp",
            "parallel.strategy",
            "FSDP shards parameters of one float dtype, and bitsandbytes' packed 4/8-bit weights are not (FSDP "
            "+ QLoRA needs them stored in the sharding dtype, bnb_4bit_quant_storage, which ecoadapt does not set "
            "up); use ddp (or none) with lora.quantize: each GPU then holds the whole quantized base, about "
            "0.55 bytes a parameter in NF4 (an 8B model: 4.4 GiB)",
        )
    need(
        cfg.train.optimizer != "paged_adamw8bit" or cfg.train.device != "cpu",
        "train.optimizer",
        "paged_adamw8bit pages its states between GPU and host memory, so it needs CUDA; on a CPU use adamw8bit",
    )
    need(
        cfg.train.optimizer == "adamw" or cfg.parallel.strategy != "fsdp",
        "train.optimizer",
        "the 8-bit optimizer's block-wise states are not sharded by FSDP here; use adamw with fsdp, or ddp",
    )
