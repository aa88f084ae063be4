"""Resumable checkpoints: everything the loop needs to continue exactly where it stopped.

One file, ``checkpoint.pt`` in the run directory, written through a temp file, fsync and
rename, so a kill at any moment leaves either the previous checkpoint or the new one, never a
torn file. It holds only what training changes: the trainable weights (an adapter is a few
hundred KiB; frozen weights are rebuilt from the base model exactly as the first start did),
their fp32 masters, the optimizer, the scheduler, the fp16 loss scaler, the RNG states, the
data position and the loop's counters. Loading uses ``weights_only=True``: a checkpoint is data,
never code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ecoadapt.config import RunConfig
from ecoadapt.core import storage
from ecoadapt.core.errors import UserError
from ecoadapt.data.batches import BlockLoader
from ecoadapt.model.precision import Policy

if TYPE_CHECKING:
    from ecoadapt.train.loop import Loop

FORMAT = 2  # 2: weights named as inside the LossModule (model. prefix)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name (through DDP's ``module.`` wrapper)."""
    inner = getattr(model, "module", model)
    return {name: p for name, p in inner.named_parameters() if p.requires_grad}


def all_finite(model: torch.nn.Module) -> bool:
    """Whether every trainable weight is finite (frozen ones cannot have changed)."""
    return all(bool(torch.isfinite(p).all()) for p in trainable(model).values())


def room_needed(cfg: RunConfig, model: torch.nn.Module, policy: Policy, lora: bool) -> int:
    """Bytes on disk a run needs for its checkpoints (the new one beside the old, with
    train.save_every) and its saved model (the adapter, or the full weights)."""
    from ecoadapt.model import layerwise

    needed = 2 * bytes_needed(model, policy) if cfg.train.save_every is not None else 0
    if cfg.output.save_model:
        needed += bytes_needed(model, policy) if lora else layerwise.weight_bytes(model)
    return needed


def bytes_needed(model: torch.nn.Module, policy: Policy) -> int:
    """Upper estimate of one checkpoint's size: weights, fp32 masters, two AdamW moments."""
    total = 0
    for p in trainable(model).values():
        total += p.numel() * p.element_size() + p.numel() * 4 * 2
        if p.dtype != torch.float32:
            total += p.numel() * 4  # the fp32 master
    return total


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`ecoadapt.core.storage.atomic_write`)."""
    storage.atomic_write(path, lambda f: torch.save(obj, f))


def capture(
    model: torch.nn.Module,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: BlockLoader,
    loop: dict[str, Any],
    extra: dict[str, Any],
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The state to save, as CPU tensors and plain values (``loop``: the loop's counters).

    Args:
        device: the training device: on CUDA its RNG state alone is kept (not every visible
            GPU's, so a resume that sees fewer GPUs still restores it).
    """
    params = trainable(model)
    names = {id(p): n for n, p in params.items()}
    masters = {names[id(p)]: m.detach().cpu().clone() for p, m in policy.masters if id(p) in names}
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "format": FORMAT,
        "weights": {n: p.detach().cpu().clone() for n, p in params.items()},
        "masters": masters,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": policy.scaler_state(),
        "rng": rng,
        "loader": loader.state_dict(),
        "loop": loop,
        "extra": extra,
    }


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save`.

    Raises:
        UserError: the file is not a readable ecoadapt checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: say which, and what to do
        raise UserError(
            f"{path}: not a readable checkpoint ({type(e).__name__}); delete it to restart, or restore a copy"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an ecoadapt checkpoint of format {FORMAT}; delete it to restart")
    return state


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: BlockLoader | None,
    device: torch.device | None = None,
) -> None:
    """Put a captured state back into a freshly prepared model, optimizer, scheduler and loader.

    Args:
        device: the training device, whose CUDA RNG state is restored.

    Raises:
        UserError: the checkpoint's weights do not match the model (a different model or
            different trainable parameters than the run that wrote it).
    """
    params = trainable(model)
    if set(params) != set(state["weights"]):
        missing = sorted(set(params) ^ set(state["weights"]))[:3]
        raise UserError(f"checkpoint: its trainable weights differ from this model's (e.g. {missing}); restart it")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["weights"][name])
        names = {id(p): n for n, p in params.items()}
        for p, master in policy.masters:
            master.copy_(state["masters"][names[id(p)]])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    policy.load_scaler_state(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if loader is not None:
        loader.load_state_dict(state["loader"])


class RunCheckpoints:
    """A run's checkpoint file: written by rank 0 every train.save_every steps and on a signal,
    read back by every rank to resume or to roll back.

    Args:
        path: the checkpoint file (``<run dir>/checkpoint.pt``).
        loader: the training data, whose position is part of the state.
        is_main: whether this process writes (rank 0; DDP replicas hold the same state).
        extra: called at each save for the run's own state (held-out loss before training,
            energy windows so far, early-stop history), returned by :meth:`extra` on resume.
    """

    def __init__(
        self, path: Path, loader: BlockLoader, is_main: bool, extra: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self.path = path
        self.loader = loader
        self.is_main = is_main
        self._extra = extra
        self.saved_at: int | None = None

    def save(self, loop: Loop) -> None:
        """Write the loop's state atomically.

        Raises:
            RuntimeError: a trainable weight is NaN or inf (never saved: the previous
                checkpoint stays the one to resume from).
        """
        if not all_finite(loop.model):
            raise RuntimeError(f"non-finite weights at step {loop.result.steps}: not checkpointed")
        if self.is_main:
            state = capture(
                loop.model,
                loop.policy,
                loop.optimizer,
                loop.scheduler,
                self.loader,
                loop.result.state(),
                self._extra() if self._extra is not None else {},
                loop.device,
            )
            atomic_save(state, self.path)
        self.saved_at = loop.result.steps

    def resume(self, loop: Loop, state: dict[str, Any]) -> None:
        """Put ``state`` (from :func:`load`) into a freshly created loop and the loader."""
        restore(state, loop.model, loop.policy, loop.optimizer, loop.scheduler, self.loader, loop.device)
        loop.result.load_state(state["loop"])
        self.saved_at = loop.result.steps

    def rollback(self, loop: Loop) -> bool:
        """Back to the last checkpoint written; False when there is none."""
        if self.saved_at is None or not self.path.exists():
            return False
        self.resume(loop, load(self.path))
        return True
