"""`plan --device` for a model this machine cannot load, or whose weights are not here: from its
``config.json`` alone.

The recipe is built on the meta device (shapes, no memory): the model from its config, in the
dtype the run would read it in (:mod:`ecoadapt.model.load_spec`), with what trains set as the run
sets it (:func:`ecoadapt.model.adapters.prepare`: LoRA adapters, trainable blocks). Then:

- weights: as the recipe stores them (NF4 or int8 blocks at their packed size);
- gradients and optimizer state: of what trains, in the dtype it trains in (fp32 under autocast,
  fp32 masters under bf16-pure, 8-bit moments for adamw8bit), by the same
  :func:`ecoadapt.model.footprint.static_bytes` a real run's forecast uses;
- activations per block row: :func:`ecoadapt.model.footprint.activation_bytes_per_row` (an
  estimate that errs high), plus one chunk of logits and its gradient (the chunked head);
- FLOPs per token: :func:`ecoadapt.measure.flops.training_flops` on the same meta model.

So an 8B model is planned here in seconds, on a machine that could not hold it. The figures are
a projection, labelled so by the table that shows them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ecoadapt.config import RunConfig
from ecoadapt.config.precision_modes import MODES
from ecoadapt.core.errors import UserError
from ecoadapt.model import adapters, footprint, load_spec, pretrained
from ecoadapt.model.load_spec import Recipe
from ecoadapt.model.losses import chunk_rows
from ecoadapt.model.precision import Policy

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def weights_missing(cfg: RunConfig) -> bool:
    """Whether the model is a local folder with a config.json and no weight files."""
    folder = Path(cfg.model.name_or_path).expanduser()
    return (
        folder.is_dir()
        and (folder / "config.json").is_file()
        and not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES)
    )


def model_config(cfg: RunConfig) -> Any:
    """The model's transformers config: a local folder's config.json, a GGUF file's (or a packaged
    model's: ``pkg:NAME``) metadata, or a hub id's config.json (cache first; no weights fetched)."""
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    kwargs: dict[str, Any] = {"revision": cfg.model.revision}
    if name.startswith("pkg:") or name.endswith(".gguf"):
        where, gguf_file, _ = pretrained.resolve(name)  # on this machine: the folder and file name
        kwargs["gguf_file"] = gguf_file
    else:
        folder = Path(name).expanduser()
        where = str(folder) if folder.is_dir() else name
    local = Path(where).expanduser().is_dir()
    try:
        with pretrained.offline() if cfg.model.offline or local else contextlib.nullcontext():
            return AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot read a config.json for {name} ({e})") from None


def probe(cfg: RunConfig, device_type: str = "cuda") -> dict[str, Any]:
    """What :func:`ecoadapt.forecast.devices.project` needs of ``cfg``'s recipe, from its shapes.

    Args:
        cfg: the recipe.
        device_type: where it would run ("cuda" for ``plan --device``): the loss's chunk of
            logits is sized per device (:func:`ecoadapt.model.losses.chunk_rows`).

    Returns:
        ``static_bytes`` (weights, gradients, optimizer, logits chunk, and for a quantized base
        the one weight it dequantizes at a time), ``activation_bytes_per_row``,
        ``flops_per_token``, ``counts``, ``source`` and ``process_bytes``: this process's resident
        set once it holds the model's code, PEFT and the tokenizer, as a run does (a CPU
        machine's plan counts it in place of a CUDA context).
    """
    from ecoadapt.measure import flops, memory

    config = model_config(cfg)
    objective = pretrained.detect_objective(config) if cfg.model.objective == "auto" else cfg.model.objective
    spec = Recipe.of(cfg).spec(load_spec.checkpoint_dtype(config))
    model, shapes = _meta_recipe(cfg, config, objective, spec)
    static = footprint.static_bytes(model, _masters(model, spec_mode(cfg)), cfg.train.optimizer)
    value_bytes = 4 if spec.compute_dtype == torch.float32 else 2
    autocast = MODES[spec_mode(cfg)].autocast
    if spec.quantize is not None:  # the blocks' Linears at their packed size, not as built here
        stored = shapes.weight_bytes(dataclasses.replace(spec, quantize=None))
        static["weights"] += shapes.weight_bytes(spec) - stored
        static["dequantized_weight"] = shapes.largest_block_linear * _dequantized_value_bytes(
            spec.quantize, value_bytes, autocast, device_type
        )
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    static["logits_chunk"] = _logits_chunk_bytes(cfg, vocab, value_bytes, device_type)
    _, blocks = pretrained.transformer_blocks(model)
    head_fraction = cfg.data.mlm_probability if objective == "mlm" else 1.0
    count = flops.training_flops(model, blocks, cfg.data.max_seq_len, int(config.hidden_size), head_fraction)
    per_row = footprint.activation_bytes_per_row(
        config, cfg.data.max_seq_len, value_bytes, cfg.train.gradient_checkpointing, 4 if autocast else None
    )
    _hold_tokenizer(cfg)
    return {
        "static_bytes": static,
        "activation_bytes_per_row": per_row,
        "flops_per_token": count.per_token,
        "counts": pretrained.parameter_counts(model),
        "source": "the model's shapes on the meta device (config.json alone; activations estimated)",
        # Measured here, after the meta model and its adapters were built and with the tokenizer
        # held: a run imports the same modules and holds its tokenizer as it trains (at 1.1B:
        # 0.43 GiB resident against 0.22 GiB before them; Gemma 3's 262k-word tokenizer alone
        # holds 0.27-0.31 GiB).
        "process_bytes": memory.rss_bytes(),
    }


def _meta_recipe(cfg: RunConfig, config: Any, objective: str, spec: Any) -> tuple[torch.nn.Module, Any]:
    """(the recipe's model on the meta device, what trains set as the run sets it and stored as
    the run stores it; the base's :class:`ecoadapt.model.load_spec.Shapes`)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    meta = pretrained.meta_model(auto, config).to(spec.dtype)
    blocks_name, _ = pretrained.transformer_blocks(meta)
    shapes = load_spec.Shapes.of(meta, blocks_name)
    # No newly initialised head is known from a config alone (an encoder's MLM head, say): it
    # would train in full, a few MB more than counted here.
    loaded = pretrained.LoadedModel(meta, None, objective, cfg.model.name_or_path, [], spec)
    with torch.device("meta"):
        model, _ = adapters.prepare(loaded, cfg.train, cfg.lora)
    policy = Policy(spec_mode(cfg), "cpu")
    policy.apply(model)  # bf16-pure: every weight (adapters too) in bf16, as the run stores them
    policy.keep_fp32_weights(model)
    return model, shapes


def _logits_chunk_bytes(cfg: RunConfig, vocab: int, value_bytes: int, device_type: str) -> int:
    """Bytes of one chunk of the chunked head's loss (:mod:`ecoadapt.model.losses`) at its peak:
    per row and vocabulary entry the logits and their gradient in the compute dtype, an fp32 copy
    of 16-bit logits, and logsumexp's fp32 temporary (12 bytes in 16 bits, 8 in fp32). A chunk
    holds at most the micro-batch's rows (its tokens)."""
    if not vocab:
        return 0
    rows_available = cfg.data.max_seq_len * (1 if cfg.train.fill_micro_batch else cfg.train.micro_batch_size)
    rows = min(chunk_rows(vocab, device_type), rows_available)
    per_value = 8 if value_bytes == 4 else 2 * value_bytes + 8
    return rows * vocab * per_value


_TOKENIZERS: dict[str, Any] = {}


def _hold_tokenizer(cfg: RunConfig) -> bool:
    """Load the model's tokenizer (where its files are here) and keep it for this process's life,
    so that its resident memory is counted as a run's is; whether it could be loaded."""
    name = cfg.model.name_or_path
    if name not in _TOKENIZERS:
        try:
            _TOKENIZERS[name] = pretrained.load_tokenizer(cfg.model)
        except (OSError, ValueError, UserError):
            _TOKENIZERS[name] = None
    return _TOKENIZERS[name] is not None


def _dequantized_value_bytes(kind: str, value_bytes: int, autocast: bool, device_type: str) -> int:
    """Bytes per weight value of the dequantized copies bitsandbytes makes of one Linear at a time.

    NF4 casts its input to the compute dtype and dequantizes to it (``value_bytes``). The int8
    layer dequantizes to its input's dtype, fp32 under autocast (the residual stream and the
    norms' outputs stay fp32); on a CPU (bitsandbytes' MatMul8bitFp) autocast then copies that
    fp32 weight to the compute dtype for the matmul, both alive at once.
    """
    if kind != "int8" or not autocast:
        return value_bytes
    return 4 + (value_bytes if device_type == "cpu" else 0)


def spec_mode(cfg: RunConfig) -> str:
    """The precision mode the plan assumes: the config's, and bf16 for auto (what auto picks on
    GPUs with native bfloat16; `plan --device` resolves auto for the device first)."""
    return cfg.precision.mode if cfg.precision.mode != "auto" else "bf16"


def _masters(model: torch.nn.Module, mode: str) -> SimpleNamespace:
    """bf16-pure's fp32 masters of the trainable weights, as shapes (what the optimizer updates)."""
    trainable = [p for p in model.parameters() if p.requires_grad and p.dtype != torch.float32]
    masters = [(p, torch.empty(p.shape, dtype=torch.float32, device="meta")) for p in trainable]
    return SimpleNamespace(masters=masters if mode == "bf16-pure" else [])
