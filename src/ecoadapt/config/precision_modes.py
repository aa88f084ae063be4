"""The precision modes: one table, the single source every other list of them reads.

Adding a mode is a row here plus the code that runs it (``model/precision.py``'s Policy); the
config's allowed values, the planner's grid, the device table's compute dtype, the micro-batch
sizer and the lean loader read this table (``tests/test_docs.py`` holds the config's Literal to
it). No torch here: the config layer reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrecisionMode:
    """One precision mode.

    Attributes:
        name: the value of ``precision.mode``.
        storage: the dtype trained weights are kept in between steps ("fp32", or "bf16" where
            fp32 master copies take the updates).
        compute: the dtype matmuls run in ("fp32", "tf32", "fp16" or "bf16").
        autocast: whether the forward pass runs under ``torch.autocast`` (weights stay fp32).
        loss_scaling: whether the loss is scaled dynamically (fp16's underflow guard).
        on_cpu: whether a CPU runs it as itself (tf32 is plain fp32 there, fp16 matmuls are
            emulated): the planner's CPU grid holds only these.
    """

    name: str
    storage: str
    compute: str
    autocast: bool
    loss_scaling: bool
    on_cpu: bool

    @property
    def sixteen_bit(self) -> bool:
        """Whether activations are 16-bit (what the activation memory estimate asks)."""
        return self.compute in ("fp16", "bf16")


MODES: dict[str, PrecisionMode] = {
    m.name: m
    for m in (
        PrecisionMode("fp32", storage="fp32", compute="fp32", autocast=False, loss_scaling=False, on_cpu=True),
        PrecisionMode("tf32", storage="fp32", compute="tf32", autocast=False, loss_scaling=False, on_cpu=False),
        PrecisionMode("fp16", storage="fp32", compute="fp16", autocast=True, loss_scaling=True, on_cpu=False),
        PrecisionMode("bf16", storage="fp32", compute="bf16", autocast=True, loss_scaling=False, on_cpu=True),
        PrecisionMode("bf16-pure", storage="bf16", compute="bf16", autocast=False, loss_scaling=False, on_cpu=True),
    )
}
AUTO = "auto"  # not a mode: chosen per device (model/precision_choice.py), then one of MODES
