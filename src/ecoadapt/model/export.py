"""Saving the adapted model: the adapter (PEFT format) and/or the full model, each atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def save(
    model: Any, tokenizer: Any, run_dir: Path, lora: bool, merge: bool, state_dict: dict[str, Any] | None = None
) -> list[str]:
    """Save the adapter and/or the full model, each through a temp folder renamed into place.

    Args:
        model: the trained model (PEFT-wrapped with LoRA), unwrapped from DDP/FSDP.
        tokenizer: saved beside each.
        run_dir: the run directory.
        lora: save ``adapter/``; with ``merge`` also ``model/``, the adapter folded into the base.
        merge: see ``lora``.
        state_dict: the full weights when they had to be gathered (FSDP); else the model's own.

    Returns:
        The names of the folders written (``adapter``, ``model``).
    """
    targets: list[tuple[str, Any]] = [("adapter", model), ("model", None)] if lora and merge else []
    if not targets:
        targets = [("adapter", model)] if lora else [("model", model)]
    written = []
    for name, obj in targets:
        tmp = run_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if obj is None:  # merged copy: fold the adapter into the base weights
            obj = model.merge_and_unload()
        obj.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, run_dir / name)
        written.append(name)
    return written
