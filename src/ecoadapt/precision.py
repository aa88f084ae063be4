"""One precision policy: how the forward pass is cast and how gradients are scaled.

- fp32: everything in float32.
- tf32: float32 storage, TF32 tensor-core matmuls on GPUs that have them (Ampere and later);
  on CPU there is no TF32 and the run is plain fp32, which the policy's notes say.
- fp16: autocast to float16 with dynamic loss scaling; a step whose gradients overflow is
  skipped, the scale halves, and both are counted.
- bf16: autocast to bfloat16 (same range as fp32, so no loss scaling).

Autocast keeps fp32 master weights and optimizer state; only the computation is 16-bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Policy:
    """The precision of one run on one device.

    Attributes:
        mode: the configured precision mode.
        device: "cpu" or "cuda".
        notes: what the user should know (TF32 unavailable, 16-bit unsupported, ...).
        skipped_steps: optimizer steps skipped because fp16 gradients overflowed.
    """

    mode: str
    device: str
    notes: list[str] = field(default_factory=list)
    skipped_steps: int = 0
    scale_decreases: int = 0
    _scaler: Any = None

    def __post_init__(self) -> None:
        if self.mode == "tf32":
            if self.device == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            else:
                self.notes.append(f"tf32: this {self.device} has no TF32 matmuls; the run is plain fp32")
        if self.mode == "bf16" and self.device == "cuda" and not torch.cuda.is_bf16_supported():
            self.notes.append("bf16: this GPU has no native bfloat16; autocast emulates it slowly")
        if self.mode == "fp16":
            self._scaler = torch.amp.GradScaler(self.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of matmuls inside autocast (float32 when no autocast)."""
        return AUTOCAST_DTYPES.get(self.mode, torch.float32)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Context for the forward pass (and the loss) in this policy's precision."""
        if self.mode in AUTOCAST_DTYPES:
            with torch.autocast(self.device, dtype=AUTOCAST_DTYPES[self.mode]):
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass, scaled under fp16 so small gradients do not flush to zero."""
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], max_norm: float | None) -> bool:
        """Clip and apply the accumulated gradients.

        Returns:
            Whether the optimizer stepped (False when fp16 gradients overflowed).
        """
        if self._scaler is None:
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            return True
        self._scaler.unscale_(optimizer)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        before = self._scaler.get_scale()
        self._scaler.step(optimizer)  # skips the step itself when it found inf/NaN gradients
        self._scaler.update()
        # .get_scale() is a device-host sync; fp16 pays it once per optimizer step.
        if self._scaler.get_scale() < before:
            self.scale_decreases += 1
            self.skipped_steps += 1
            return False
        return True

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale, or None in other modes."""
        return float(self._scaler.get_scale()) if self._scaler is not None else None

    def summary(self) -> dict[str, Any]:
        """The precision part of summary.json."""
        return {
            "mode": self.mode,
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
            "skipped_steps": self.skipped_steps,
            "loss_scale": self.loss_scale,
            "notes": list(self.notes),
        }
