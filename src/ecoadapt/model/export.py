"""Saving the adapted model: the adapter (PEFT format) and/or the full model, each atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ecoadapt.core.storage import fsync


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
        replace_folder(tmp, run_dir / name)
        written.append(name)
    return written


def replace_folder(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``, replacing what is there: old aside, new in place,
    old removed. A kill at any moment leaves the old folder or the new one at ``target``, or
    (between the two renames) the old one aside as ``target.old``, which the next call puts
    back first."""
    aside = target.with_name(target.name + ".old")
    if aside.is_dir() and not target.exists():
        os.replace(aside, target)  # a kill between the renames: the old one is still whole
    _fsync_files(new)
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(new, target)
    fsync(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_files(folder: Path) -> None:
    """Flush the files of ``folder``, and the folder, to disk before it is trusted (renamed into place)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fsync(path)
    fsync(folder)
