"""How a run's weights are read: in which dtype, quantized or not, onto which device.

A model is never loaded whole in fp32 unless the recipe trains fp32 weights read from the
checkpoint. The rule, per recipe:

- ``bf16-pure``: every weight in bf16 (what the recipe stores; trainable ones get fp32
  masters in the optimizer, as before).
- fp32 and tf32: fp32 (the compute dtype is fp32; nothing is smaller).
- fp16 / bf16 autocast with a frozen base (LoRA without merging): the base in the autocast
  dtype. Autocast casts every frozen matmul weight to it anyway, so the matmuls see the same
  numbers; the adapters and any newly initialised head are created, or cast, in fp32.
- autocast with weights that train (full or ``train.trainable_layers``): fp32, unless the
  checkpoint itself is stored in the autocast dtype, where reading it in that dtype and
  casting the trained weights up to fp32 afterwards loses nothing.
- ``lora.quantize``: the blocks' Linears quantized as they load (bitsandbytes through
  transformers' quantization config), everything else as the frozen-base rule says.
- ``lora.merge``: the base as stored at full precision (fp32), so the merged model saves the
  same weights a full-precision merge would.
- FSDP under autocast: fp32 (one dtype per shard unit).

transformers reads safetensors shard by shard, memory-mapped, into a model built on the meta
device, so the load's peak is the model in the load dtype plus about one shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ecoadapt.config.precision_modes import MODES
from ecoadapt.model.footprint import moments_bytes
from ecoadapt.model.precision import AUTOCAST_DTYPES

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class LoadSpec:
    """How to read a model's weights.

    Attributes:
        dtype: every floating-point weight is read straight into this dtype.
        quantize: ``nf4`` or ``int8``: the transformer blocks' Linears quantized while loading
            (None: not quantized).
        compute_dtype: what quantized matmuls dequantize to (the run's compute precision).
        why: one line, for the summary and the CLI.
    """

    dtype: torch.dtype = torch.float32
    quantize: str | None = None
    compute_dtype: torch.dtype = torch.float32
    why: str = "fp32: the default"

    def as_dict(self) -> dict[str, Any]:
        return {
            "dtype": DTYPE_NAMES[self.dtype],
            "quantize": self.quantize,
            "compute_dtype": DTYPE_NAMES[self.compute_dtype],
            "why": self.why,
        }


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's weights are stored in, from its config (None: not recorded)."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


@dataclass(frozen=True)
class Recipe:
    """What of a run's recipe decides how its weights are read.

    Attributes:
        mode: precision.mode, resolved (not auto).
        frozen_base: lora.enabled (the base does not train).
        merge: lora.merge (the base must stay as stored at full precision).
        quantize: lora.quantize.
        fsdp: parallel.strategy is fsdp: an autocast recipe reads fp32, as before (a shard unit
            that mixes a 16-bit frozen base with fp32 adapters made the 2-process CPU test abort
            at exit about one run in two; see ecoadapt.train.prepare.apply_precision).
    """

    mode: str = "fp32"
    frozen_base: bool = False
    merge: bool = False
    quantize: str | None = None
    fsdp: bool = False

    @classmethod
    def of(cls, cfg: Any) -> Recipe:
        """The recipe of a RunConfig (``precision.mode: auto`` counts as fp32 until resolved)."""
        mode = cfg.precision.mode if cfg.precision.mode != "auto" else "fp32"
        return cls(mode, cfg.lora.enabled, cfg.lora.merge, cfg.lora.quantize, cfg.parallel.strategy == "fsdp")

    def spec(self, stored: torch.dtype | None) -> LoadSpec:
        """How to read this recipe's weights (the rule in the module's docstring).

        Args:
            stored: the checkpoint's own dtype (:func:`checkpoint_dtype`); None where unknown.
        """
        mode, quantize = self.mode, self.quantize
        pure = MODES[mode].storage == "bf16"  # bf16-pure: weights kept in bf16, fp32 masters updated
        compute = torch.bfloat16 if pure else AUTOCAST_DTYPES.get(mode, torch.float32)
        if pure:
            return LoadSpec(torch.bfloat16, quantize, compute, "bf16-pure stores every weight in bf16")
        if compute == torch.float32:
            return LoadSpec(torch.float32, quantize, compute, f"{mode} computes in fp32")
        name = DTYPE_NAMES[compute]
        if self.fsdp:
            return LoadSpec(torch.float32, quantize, compute, "FSDP shards one dtype per unit: fp32 under autocast")
        if self.frozen_base and self.merge:
            return LoadSpec(torch.float32, quantize, compute, "lora.merge saves the base as stored, in fp32")
        if self.frozen_base:
            why = f"the frozen base in {name}, the dtype autocast computes its matmuls in; adapters in fp32"
            return LoadSpec(compute, quantize, compute, why)
        if stored == compute:
            why = f"the checkpoint is stored in {name}; trained weights are cast up to fp32 after loading"
            return LoadSpec(compute, quantize, compute, why)
        return LoadSpec(torch.float32, quantize, compute, f"{mode} autocast trains fp32 weights from the checkpoint")


# bitsandbytes' NF4 with double quantization: half a byte per value, an 8-bit scale per 64
# values, and an fp32 scale (plus offset) per 256 of those.
NF4_BYTES_PER_VALUE = 0.5 + 1 / 64 + 8 / (64 * 256)


@dataclass(frozen=True)
class Shapes:
    """A model's weights by role, from its meta-device copy (no memory).

    Attributes:
        block_linear_values: values in the transformer blocks' ``nn.Linear`` weights (what
            lora.quantize quantizes).
        block_linear_rows: their output rows (int8 keeps one fp32 scale per row).
        other_values: every other floating-point weight (embeddings, norms, biases, the head;
            a tied matrix once).
        outside_blocks: names of the ``nn.Linear`` modules outside the blocks (kept as loaded
            when quantizing, as transformers keeps the head).
        largest_block_linear: values in the blocks' largest ``nn.Linear`` weight (a quantized
            base dequantizes one such weight at a time, forward and backward).
    """

    block_linear_values: int
    block_linear_rows: int
    other_values: int
    outside_blocks: list[str]
    largest_block_linear: int = 0

    @classmethod
    def of(cls, model: torch.nn.Module, blocks_name: str) -> Shapes:
        linear_weights: dict[int, int] = {}
        rows = 0
        outside: list[str] = []
        for name, module in model.named_modules():
            if type(module) is not torch.nn.Linear:
                continue
            if name.startswith(blocks_name + "."):
                linear_weights[id(module.weight)] = module.weight.numel()
                rows += module.out_features
            else:
                outside.append(name)
        other = sum(p.numel() for p in model.parameters() if id(p) not in linear_weights)
        return cls(sum(linear_weights.values()), rows, other, outside, max(linear_weights.values(), default=0))

    def weight_bytes(self, spec: LoadSpec) -> int:
        """Bytes the weights take when read as ``spec`` says."""
        size = torch.finfo(spec.dtype).bits // 8
        if spec.quantize == "nf4":
            blocks = self.block_linear_values * NF4_BYTES_PER_VALUE
        elif spec.quantize == "int8":
            blocks = self.block_linear_values + 4 * self.block_linear_rows
        else:
            blocks = self.block_linear_values * size
        return int(blocks + self.other_values * size)


def available_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def full_training_bytes(shapes: Shapes, spec: LoadSpec, recipe: Recipe, optimizer: str | None) -> int:
    """Bytes that training every weight adds to the weights as read (``spec``): gradients, the
    optimizer's two moments (fp32, or 8-bit for adamw8bit and paged_adamw8bit), and fp32 masters
    for 16-bit weights (bf16-pure; under autocast a 16-bit read is cast up to fp32).

    Args:
        optimizer: train.optimizer; None: not every weight trains (LoRA, a few layers): 0.
    """
    if optimizer is None:
        return 0
    values = shapes.block_linear_values + shapes.other_values
    moments = moments_bytes(values, 4, optimizer)  # as the forecast counts them: for fp32 weights or masters
    if MODES[recipe.mode].storage == "bf16":
        return values * (2 + 4) + moments  # bf16 gradients, fp32 masters
    read = torch.finfo(spec.dtype).bits // 8
    return values * ((4 - read) + 4) + moments


def check_room(
    shapes: Shapes,
    spec: LoadSpec,
    device: torch.device,
    limit_bytes: int | None,
    name: str,
    training_bytes: int = 0,
) -> None:
    """Refuse, before anything is read, weights (and the training state of a full fine-tune)
    that cannot fit the memory there is.

    Args:
        shapes: the model's shapes.
        spec: how it would be read.
        device: where its weights will live.
        limit_bytes: memory the weights may take (train.max_memory_gb, less what the process
            holds already); None: only what ``device`` has free.
        name: the model, for the message.
        training_bytes: what training adds on ``device`` (:func:`full_training_bytes`; 0: none
            counted, as for LoRA, whose adapters are a few MB).

    Raises:
        UserError: naming the bytes needed, the bytes there are, and the recipes whose weights fit.
    """
    from ecoadapt.core.errors import UserError

    room = available_bytes(device)
    where = f"free on {device.type}"
    if limit_bytes is not None and limit_bytes < room:
        room, where = max(0, limit_bytes), "left under train.max_memory_gb"
    weights = shapes.weight_bytes(spec)
    needed = weights + training_bytes
    if needed <= room:
        return
    lighter = [
        ("a bf16 base under LoRA (lora.enabled: true, precision.mode: bf16)", LoadSpec(torch.bfloat16)),
        ("an int8 base (lora.enabled: true, lora.quantize: int8)", LoadSpec(torch.bfloat16, "int8")),
        ("an NF4 base (lora.enabled: true, lora.quantize: nf4)", LoadSpec(torch.bfloat16, "nf4")),
    ]
    sizes = [(what, shapes.weight_bytes(s)) for what, s in lighter]
    fits = [f"{what}, {size / 2**30:.2f} GiB" for what, size in sizes if size <= room]
    advice = f"recipes whose weights fit: {'; '.join(fits)}" if fits else "no recipe's weights fit: use a smaller model"
    what = f"weights need {weights / 2**30:.2f} GiB"
    if training_bytes:
        what = (
            f"weights ({weights / 2**30:.2f} GiB) and the gradients and optimizer state of training every one "
            f"({training_bytes / 2**30:.2f} GiB) need {needed / 2**30:.2f} GiB"
        )
    raise UserError(
        f"model.name_or_path: {name}'s {what} as this recipe reads them "
        f"({spec.as_dict()['dtype']}{', ' + spec.quantize if spec.quantize else ''}), and {room / 2**30:.2f} GiB "
        f"are {where}; {advice}"
    )
