"""Data parallelism through torch.distributed: set-up, DDP / FSDP wrapping, rank-0 helpers.

Launch with ``torchrun --nproc-per-node N -m ecoadapt adapt CONFIG`` (or ``--set
parallel.nproc=N``, which makes ecoadapt start torchrun itself). NCCL on GPUs, gloo on CPUs.

Exactness: every rank builds the same *global* micro-batch (``micro_batch_size x world``
blocks, the same masks) and trains on its own slice of it, so the shards are disjoint and
deterministic, and every rank knows the global number of target tokens without communicating.
Each rank divides its summed loss by that global count; DDP and FSDP average gradients over
ranks, so the loss is also multiplied by the world size: the update is then exactly that of one
process with batch ``N x b x a``. Gradients are not synchronised on accumulation micro-steps.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ecoadapt.core.errors import UserError
from ecoadapt.model.losses import LossModule


@dataclass(frozen=True)
class World:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 writes outputs).
        size: number of processes.
        local_rank: rank on this machine (picks the GPU).
        strategy: "none", "ddp" or "fsdp".
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.size > 1


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(choice: str) -> torch.device:
    """The device of a single-process run: ``auto`` takes the GPU when one is visible."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is visible; use auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def setup(strategy: str, device_choice: str, timeout_s: float) -> tuple[World, torch.device]:
    """Join the process group (when launched as several processes) and pick this rank's device.

    Args:
        strategy: parallel.strategy (auto, none, ddp, fsdp).
        device_choice: train.device (auto, cpu, cuda).
        timeout_s: collective timeout: a rank that dies makes the others fail after this long
            at most (torchrun usually stops them sooner).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = pick_device(device_choice).type == "cuda"
    if size == 1:
        if strategy in ("ddp", "fsdp"):
            raise UserError(
                f"parallel.strategy = {strategy} needs several processes: launch with torchrun "
                "--nproc-per-node N, or set parallel.nproc"
            )
        return World(), torch.device("cuda" if use_cuda else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = _rank_gpu(rank, local_rank, size)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Two processes on two cores: one intra-op thread each, or they fight over the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", size))))
    if strategy == "none":
        raise UserError(f"parallel.strategy = none, but {size} processes were launched; use ddp or fsdp")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,  # binds NCCL to this rank's GPU at once
        )
    return World(rank, size, local_rank, "fsdp" if strategy == "fsdp" else "ddp"), device


def _rank_gpu(rank: int, local_rank: int, size: int) -> torch.device:
    """This rank's GPU: the one numbered LOCAL_RANK among those it sees.

    Raises:
        UserError: more processes on this machine than GPUs visible to them (say
            parallel.nproc=2 on one GPU), naming both counts.
    """
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        local = os.environ.get("LOCAL_WORLD_SIZE", str(size))
        raise UserError(
            f"parallel: {local} processes on this machine but rank {rank} sees {visible} GPU(s) "
            f"(LOCAL_RANK {local_rank} has none): start at most {visible} per machine (torchrun "
            f"--nproc-per-node {visible}, or parallel.nproc={visible}), or train on CPU with train.device=cpu"
        )
    return torch.device("cuda", local_rank)


def teardown(barrier: bool) -> None:
    """Leave the process group (after a barrier, on the clean path), if still in one."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: torch.device, blocks: nn.ModuleList | None = None) -> nn.Module:
    """Wrap the model for data parallelism: DDP, or FSDP2 (``fully_shard``) per block."""
    if not world.distributed:
        return model
    if world.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks or []:
            fully_shard(block)  # parameters, gradients and optimizer state sharded per block
        fully_shard(model)  # the rest (embeddings, final norm, head) as one unit; shards go to the device
        return model.to(device)  # buffers (rotary tables, position ids) follow the shards
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def check_fsdp_units(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Refuse parameter dtypes mixed inside one FSDP unit (each block, and the rest of the model):
    FSDP2 gathers a unit's parameters as one flat group of one dtype.

    Raises:
        UserError: naming the unit and its dtypes, and what to change.
    """
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    units = [(f"block {i}", list(b.parameters())) for i, b in enumerate(blocks)]
    units.append(("the rest of the model", [p for p in model.parameters() if id(p) not in in_blocks]))
    for name, params in units:
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
        if len(dtypes) > 1:
            raise UserError(
                f"precision.layers: with parallel.strategy = fsdp each sharded unit must hold one dtype, but "
                f"{name} mixes {', '.join(dtypes)}; map whole blocks (e.g. '*.layers.*': bf16, no patterns inside "
                "a block), or use ddp"
            )


def full_state_dict(model: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on CPU, gathered from the shards under FSDP (a collective:
    every rank calls it); None where nothing needs gathering."""
    if world.strategy != "fsdp" or not world.distributed:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "model." if isinstance(model, LossModule) else ""  # the language model's own names
    return {k.removeprefix(prefix): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def reshard(model: nn.Module) -> None:
    """Put FSDP's sharded parameters back on the model (a no-op without FSDP).

    FSDP2 keeps the root unit (embeddings, final norm, head) unsharded after a forward pass, as
    registered parameters of their own, until a backward pass reshards it: whatever reads the
    model's parameters in between (an optimizer built after the held-out evaluation) gets those
    temporary copies. An optimizer holding them updated nothing FSDP used: the root never
    trained, and FSDP's losses drifted from DDP's by 0.1-0.5% in 5 steps.
    """
    reshard_unit = getattr(model, "reshard", None)
    if callable(reshard_unit):
        reshard_unit()


def unwrap(model: nn.Module) -> nn.Module:
    """The language model inside a DDP wrapper (FSDP2 modules are the model itself) and its
    LossModule."""
    inner = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    return inner.model if isinstance(inner, LossModule) else inner


@contextlib.contextmanager
def gradient_sync(model: Any, enabled: bool) -> Iterator[None]:
    """Synchronise gradients in this backward pass only when ``enabled`` (the last micro-step)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a stop decision, say, so that all ranks stop together)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: float, world: World, device: torch.device) -> float:
    """The sum of ``value`` over every rank (itself in a single process)."""
    if not world.distributed:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(box)
    return float(box.item())


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def end_rank(code: int) -> None:
    """End a rank of a finished torchrun job: every output is written and the process group
    left, so skip C++ static destructors, where gloo's threads aborted a worker ("terminate
    called without an active exception") or left rank 0 hanging after its peer had gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m ecoadapt ARGV`` as ``nproc`` processes under torchrun; its exit status.

    torchrun runs in a process group of its own: a SIGTERM or SIGINT sent to this launcher
    (a scheduler, `kill`, Ctrl-C) is passed on to it, and it to the workers, which checkpoint
    and exit; the status is then 128 + the signal's number.
    """
    from ecoadapt.core.processes import run_child

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return run_child([*cmd, "-m", "ecoadapt", *argv]).exit_status
