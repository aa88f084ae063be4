"""GGUF checkpoints converted once into a model folder in the cache, then loaded like any folder.

transformers reads a GGUF file whole: every tensor is dequantized to fp32 in memory before the
model is built, and the tokenizer is rebuilt from the file's vocabulary, at every load (Gemma 3
270M: about 50 s on 2 cores and a 3.35 GB peak, each time; a run loads its base three times or
more: to train, for the probe's classifier, for the harness). ecoadapt converts a GGUF file once
into ``<cache>/gguf/<key>/`` (config, tokenizer and fp32 safetensors shards: the dequantized
values exactly), and every later load reads that folder shard by shard straight into the
recipe's dtype, a QLoRA base quantized as it loads, as for any model folder
(:mod:`ecoadapt.model.load_spec`). The key is the file's name, size and modification time with a
hash of its first and last MiB: a replaced file is converted again. The conversion takes the
cache's lock (two runs convert once) and is renamed into place when complete; when the disk has
no room for it (4 bytes a parameter), the GGUF file is read directly, as before, and the log
says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ecoadapt.core import locks
from ecoadapt.core.progress import say
from ecoadapt.core.storage import cache_root, fsync

SHARD = "1GB"  # safetensors shard size of a converted folder
FORMAT = 2  # bump when what a converted folder holds changes: older ones are converted again (2: tied heads)
MARKER = "converted-from.json"  # written last: the folder is complete
EDGE = 1 << 20  # bytes hashed at each end of the file for its key


def lean(where: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Where to load a model from: a GGUF file's converted folder (converting it now if it never
    was), or ``(where, gguf_file)`` unchanged for a folder, or for a GGUF file with no room to
    convert."""
    if gguf_file is None:
        return where, None
    path = Path(where) / gguf_file
    root = cache_root() / "gguf"
    folder = root / key(path)
    if (folder / MARKER).is_file():
        return str(folder), None
    needed = _fp32_bytes(where, gguf_file)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed is None or free < needed * 1.1:
        why = "its size is unknown" if needed is None else f"{needed / 2**30:.1f} GiB, {free / 2**30:.1f} free"
        say(f"note: {path.name} is read from GGUF at every load ({why} for a converted copy in {root})")
        return where, gguf_file
    with locks.held(root / f"{folder.name}.lock", f"the GGUF conversion {folder}", 3600.0, say):
        if not (folder / MARKER).is_file():
            _convert(path, folder)
    return str(folder), None


def key(path: Path) -> str:
    """A GGUF file's key: its name, size, modification time and the hash of its first and last MiB."""
    stat = path.stat()
    h = hashlib.sha256(f"{FORMAT}|{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(EDGE))
        f.seek(max(0, stat.st_size - EDGE))
        h.update(f.read(EDGE))
    return h.hexdigest()[:32]


def _fp32_bytes(where: str, gguf_file: str) -> int | None:
    """The converted folder's size: 4 bytes per parameter, from the shapes (None: unreadable)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(where, gguf_file=gguf_file, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError):
        return None
    return 4 * sum(p.numel() for p in model.parameters())


def _untied_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights with a head tied to the input embedding left out: the embedding is
    saved under its own name (which every model class of the checkpoint reads, a sequence
    classifier too), and loading ties the head to it again. (Saving both names lets the saver
    keep one of them, the head's, and a classifier, which has no head, got random embeddings.)"""
    state = model.state_dict()
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None:
        return state
    own = next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)
    shared = [k for k, v in state.items() if k != own and v.data_ptr() == weight.data_ptr()]
    return {k: v for k, v in state.items() if k not in shared}


def _convert(path: Path, folder: Path) -> None:
    """Read ``path`` once through transformers' GGUF reader and write it as a model folder."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ecoadapt.model import voice

    say(f"converting {path.name} from GGUF into {folder} once (later loads read it lean)")
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        with voice.quiet_gguf_conversion():
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        # transformers counts a GGUF-read model as quantized ("gguf") and will not save it: the
        # weights go out as plain safetensors shards (a tied head once), the config without that.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        save_torch_state_dict(_untied_state(model), tmp, max_shard_size=SHARD)
        tokenizer.save_pretrained(tmp)
        del model
        (tmp / MARKER).write_text(json.dumps({"gguf": str(path), "format": FORMAT}))
        for file in tmp.iterdir():
            fsync(file)
        shutil.rmtree(folder, ignore_errors=True)  # an older, incomplete attempt
        os.replace(tmp, folder)
        fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
