"""QLoRA's frozen base: the transformer blocks' Linear weights stored in 4-bit NF4 or 8 bits.

The backend is bitsandbytes (the one PEFT's LoRA layers know): on CUDA, and on CPUs through its
CPU backend (checked on this project's CI machine with bitsandbytes 0.50 and torch 2.13:
NF4 with double quantization, int8, and the 8-bit AdamW all run there). torchao's NF4 is the
route torchtune takes where bitsandbytes cannot run; PEFT does not wrap it with LoRA, so it is
not offered here.

Only the Linears inside the stack of transformer blocks are quantized: the embeddings and the
LM head keep the precision they were loaded in, as transformers' own bitsandbytes loading
keeps its head (``llm_int8_skip_modules``).

Folders and hub ids are quantized while they load (:func:`load_config`: transformers'
``BitsAndBytesConfig``, each weight quantized as its shard is read, on the training device), so
the load never holds the base at full precision. A GGUF file (transformers dequantizes its own
format tensor by tensor) is quantized after loading by :func:`frozen_base`, from the load dtype.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecoadapt.core.errors import UserError
from ecoadapt.core.progress import say
from ecoadapt.model import voice
from ecoadapt.model.load_spec import LoadSpec

INSTALL = "pip install 'ecoadapt[qlora]' (bitsandbytes, and accelerate for transformers' quantized loading)"


@dataclass
class QuantizedBase:
    """What :func:`frozen_base` did, for the summary.

    Attributes:
        kind: ``nf4`` or ``int8``.
        backend: the library and version that stores and multiplies the weights.
        modules: Linear modules quantized.
        bytes_before: their weight bytes as loaded.
        bytes_after: their weight bytes quantized (codes and scales).
        compute_dtype: what the quantized matmuls compute in.
    """

    kind: str
    backend: str
    modules: int
    bytes_before: int
    bytes_after: int
    compute_dtype: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bitsandbytes() -> Any:
    """The bitsandbytes module, or a UserError that says how to install it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"lora.quantize and train.optimizer: adamw8bit need bitsandbytes: {INSTALL}")
    import bitsandbytes as bnb

    return bnb


def load_config(kind: str, compute_dtype: torch.dtype, keep: list[str]) -> Any:
    """transformers' quantization config for a base quantized while it loads.

    Args:
        kind: ``nf4`` or ``int8`` (the same settings :func:`frozen_base` uses).
        compute_dtype: what the 4-bit matmuls dequantize to.
        keep: names of Linear modules left unquantized (those outside the blocks).
    """
    bitsandbytes()
    note = voice.kernels_note() if kind == "nf4" else None
    if note is not None:
        say(f"note: {note}")
    if importlib.util.find_spec("accelerate") is None:
        raise UserError(f"lora.quantize: transformers' quantized loading needs accelerate: {INSTALL}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=kind == "nf4",
        load_in_8bit=kind == "int8",
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_threshold=6.0,
        llm_int8_skip_modules=keep,
    )


def describe_loaded(model: nn.Module, spec: LoadSpec) -> QuantizedBase:
    """What quantizing while loading did, as :func:`frozen_base` reports it (``bytes_before``:
    the quantized weights' bytes in the dtype the rest of the model was read in)."""
    assert spec.quantize is not None
    kind, compute_dtype, loaded_dtype = spec.quantize, spec.compute_dtype, spec.dtype
    bnb = bitsandbytes()
    found: list[Any] = [m for m in model.modules() if is_quantized(m)]
    before = after = 0
    for module in found:
        values = int(module.in_features) * int(module.out_features)
        before += values * (torch.finfo(loaded_dtype).bits // 8)
        after += _stored_bytes(module)
        if isinstance(module, bnb.nn.Linear4bit):
            _no_cpu_repack(module)
    return QuantizedBase(
        kind, f"bitsandbytes {bnb.__version__}", len(found), before, after, str(compute_dtype).replace("torch.", "")
    )


def _no_cpu_repack(module: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel at
    the first forward pass without gradients (the held-out evaluation), and the training passes
    after it then left every LoRA B at zero (measured: bitsandbytes 0.50.2, torch 2.13)."""
    module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]


def frozen_base(
    model: nn.Module, blocks: nn.ModuleList, kind: str, compute_dtype: torch.dtype, device: torch.device
) -> QuantizedBase:
    """Replace every ``nn.Linear`` in ``blocks`` by its frozen ``kind`` copy on ``device``.

    Args:
        model: the whole model; marked as quantized so that PEFT puts its bitsandbytes LoRA
            layers on the quantized Linears.
        blocks: the model's transformer blocks.
        kind: ``nf4`` (4-bit NormalFloat with double quantization of the scales) or ``int8``
            (LLM.int8(), outlier columns above 6.0 kept in 16 bits).
        compute_dtype: the dtype the 4-bit matmuls dequantize to (the run's compute precision).
        device: where the weights are quantized and stay (the training device).

    Returns:
        What was quantized and the bytes it saved.
    """
    bnb = bitsandbytes()
    found = [(block, name, m) for block in blocks for name, m in block.named_modules() if type(m) is nn.Linear]
    if not found:
        raise UserError("lora.quantize: this model's blocks have no nn.Linear layers to quantize")
    before = after = 0
    for block, name, linear in found:
        before += linear.weight.numel() * linear.weight.element_size()
        quantized = _nf4(bnb, linear, compute_dtype) if kind == "nf4" else _int8(bnb, linear)
        quantized = quantized.to(device)  # bitsandbytes quantizes when the weight moves
        after += _stored_bytes(quantized)
        block.set_submodule(name, quantized)
    # PEFT reads these flags (set by transformers' own quantized loading) to pick its LoRA layers.
    model.is_loaded_in_4bit = kind == "nf4"  # type: ignore[assignment]
    model.is_loaded_in_8bit = kind == "int8"  # type: ignore[assignment]
    return QuantizedBase(
        kind, f"bitsandbytes {bnb.__version__}", len(found), before, after, str(compute_dtype).replace("torch.", "")
    )


def _nf4(bnb: Any, linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,  # double quantization: the absmax scales stored in 8 bits
        quant_type="nf4",
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.detach().to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    _no_cpu_repack(q)
    return q


def _int8(bnb: Any, linear: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=6.0
    )
    q.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q


def _stored_bytes(module: nn.Module) -> int:
    """Bytes of a quantized Linear's weight: its codes, plus its scales."""
    weight: Any = module.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)  # 4-bit: absmax (8-bit codes + their own scales)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        nested = getattr(state, "state2", None)
        if nested is not None:
            total += nested.absmax.numel() * nested.absmax.element_size()
    scales = getattr(weight, "SCB", None)  # int8: one fp32 scale per output row
    if scales is not None:
        total += scales.numel() * scales.element_size()
    return total


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4- or 8-bit Linear. Never imports bitsandbytes (a
    second of start-up, every run with a task): no module is quantized unless it was imported."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def has_quantized(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


def full_precision_state(body: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``body`` would have as a plain fp32 model: each quantized Linear's weight
    dequantized (the values the run trained on), with its LoRA update added where an adapter
    sits on it. PEFT's own merge would requantize the sum, rounding the adapter away.

    Args:
        body: the transformer (no LM head), with bitsandbytes Linears and PEFT LoRA layers.
    """
    from peft.utils.integrations import dequantize_bnb_weight

    def dequantized(layer: Any) -> torch.Tensor:
        return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()

    out: dict[str, torch.Tensor] = {}

    def visit(prefix: str, module: Any) -> None:
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A") and is_quantized(base):
            weight = dequantized(base)
            for name in module.active_adapters:
                if name in module.lora_A:
                    weight = weight + module.get_delta_weight(name).float()
            out[prefix + "weight"], layer = weight.cpu(), base
        elif is_quantized(module):
            out[prefix + "weight"], layer = dequantized(module).cpu(), module
        else:
            skip: set[str] = getattr(module, "_non_persistent_buffers_set", set())
            for name, p in module.named_parameters(recurse=False):
                out[prefix + name] = p.detach().float().cpu()
            for name, b in module.named_buffers(recurse=False):
                if name not in skip and b is not None:
                    out[prefix + name] = b.detach().float().cpu()
            for name, child in module.named_children():
                visit(f"{prefix}{name}.", child)
            return
        if layer.bias is not None:
            out[prefix + "bias"] = layer.bias.detach().float().cpu()

    visit("", body)
    return out
