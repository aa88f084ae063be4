"""The batch a run trains with: tokens per optimizer step (the user's hyperparameter) apart from
the micro-batch (how the device gets through it).

``train.tokens_per_step`` fixes the effective batch; the micro-batch size then sets how many
micro-batches are accumulated. ``train.micro_batch_size: auto`` leaves the micro-batch to the
run: each process draws its whole share of the step as one batch and the loop splits it into
as many micro-batches as the device needs (:mod:`ecoadapt.train.micro_batch` chooses how many),
so the rows of every step, and therefore the arithmetic, do not depend on the choice.

Resolved here once, when the configuration is read: the stored configuration (``config.yaml``,
``summary.json``) holds plain numbers, ``train.micro_batch_size`` the blocks each process
draws per step and ``train.fill_micro_batch`` true, and reading it again gives the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Blocks per optimizer step and process when micro_batch_size is auto and tokens_per_step is
# not set: the default run's step (micro-batch 8, no accumulation), so "auto" alone changes how
# the step is computed, never which rows it holds.
DEFAULT_BLOCKS_PER_STEP = 8


AUTO = 0  # train.micro_batch_size: auto, as read (resolved below into a number)


def read_auto(values: dict[str, Any]) -> dict[str, Any]:
    """The train section as written, with micro_batch_size: auto turned into what it means
    (fill_micro_batch, the size left to :func:`resolve`), so the key stays an integer."""
    if values.get("micro_batch_size") == "auto":
        return {**values, "micro_batch_size": AUTO, "fill_micro_batch": True}
    return values


def resolve(cfg: Any, need: Callable[[bool, str, str], None]) -> None:
    """Turn train.tokens_per_step and a filled micro-batch into plain numbers, in place.

    ``cfg`` is the RunConfig (not imported: it imports this module); ``need(ok, key, what)``
    reports a key whose value cannot hold.

    Raises:
        UserError (through ``need``): tokens per step that are not a whole number of blocks per
            process, or a train.grad_accum that contradicts them.
    """
    t = cfg.train
    need(
        t.micro_batch_size >= 1 or (t.fill_micro_batch and t.micro_batch_size == AUTO),
        "train.micro_batch_size",
        "must be at least 1, or auto",
    )
    if t.tokens_per_step is None:
        if t.fill_micro_batch:  # the same step as without filling, drawn whole and split as needed
            t.micro_batch_size = (t.micro_batch_size or DEFAULT_BLOCKS_PER_STEP) * t.grad_accum
            t.grad_accum = 1
        return
    unit = cfg.data.max_seq_len * cfg.parallel.nproc
    need(
        t.tokens_per_step >= unit and t.tokens_per_step % unit == 0,
        "train.tokens_per_step",
        f"must be a multiple of data.max_seq_len x parallel.nproc = {unit} (each process draws whole "
        f"blocks), for example {max(1, (t.tokens_per_step + unit // 2) // unit) * unit}",
    )
    blocks = t.tokens_per_step // unit  # per process and step
    if t.fill_micro_batch:
        need(
            t.grad_accum == 1,
            "train.grad_accum",
            "train.micro_batch_size: auto chooses the accumulation (the step's blocks split to fit); leave it out",
        )
        t.micro_batch_size = blocks
        return
    micro = t.micro_batch_size
    need(
        blocks % micro == 0,
        "train.tokens_per_step",
        f"makes {blocks} blocks per process and step, which train.micro_batch_size = {micro} does not divide; "
        "pick a micro-batch that divides it, or set train.micro_batch_size: auto",
    )
    need(
        t.grad_accum in (1, blocks // micro),
        "train.grad_accum",
        f"contradicts train.tokens_per_step (which makes it {blocks // micro}); leave train.grad_accum out",
    )
    t.grad_accum = blocks // micro
