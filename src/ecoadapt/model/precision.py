"""One precision policy: how weights are stored, how each layer computes, how gradients scale.

Global modes (``precision.mode``):

- fp32: everything in float32.
- tf32: float32 storage, TF32 tensor-core matmuls on GPUs that have them (Ampere and later);
  on CPU there is no TF32 and the run is plain fp32, which the policy's notes say.
- fp16: autocast to float16 with dynamic loss scaling; a step whose gradients overflow is
  skipped, the scale halves, and both are counted.
- bf16: autocast to bfloat16 (fp32 weights and optimizer; 16-bit matmuls).
- bf16-pure: weights, activations and gradients stored in bfloat16. Updates smaller than
  bf16's resolution (2^-8 relative) would vanish if applied to bf16 weights, so the optimizer
  keeps an fp32 *master* copy of every trainable weight, applies the update there, and copies
  the rounded result back (Micikevicius et al. 2018). The memory win is in activations and in
  frozen weights (LoRA, frozen blocks: half of fp32's); fully trained weights cost the same
  16 bytes per parameter as fp32 (2 weight + 2 gradient + 4 master + 8 Adam).

Per-layer precision (``precision.layers``, see :mod:`ecoadapt.model.layerwise`) stores the matched
modules' weights in their dtype and runs their computation in it, on top of the global mode.
Every trainable weight stored below fp32 gets an fp32 master, whatever put it there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ecoadapt.config.precision_modes import MODES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The modes that run under torch.autocast, and in which dtype (from the one table of modes).
AUTOCAST_DTYPES = {name: DTYPES[mode.compute] for name, mode in MODES.items() if mode.autocast}


@dataclass
class Policy:
    """The precision of one run on one device.

    Attributes:
        mode: the configured precision mode.
        device: "cpu" or "cuda".
        notes: what the user should know (TF32 unavailable, 16-bit slower than fp32, ...).
        skipped_steps: optimizer steps skipped because fp16 gradients overflowed (each one
            also halved the loss scale: GradScaler lowers it exactly when it skips).
        needs_scaler: use dynamic loss scaling (fp16 mode, or fp16 layers).
    """

    mode: str
    device: str
    notes: list[str] = field(default_factory=list)
    skipped_steps: int = 0
    needs_scaler: bool = False
    _scaler: Any = None
    _masters: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)
    _tf32_before: tuple[bool, bool] | None = None

    def __post_init__(self) -> None:
        if self.device == "cuda":
            self._set_tf32()
        elif self.mode == "tf32":
            self.notes.append(f"tf32: this {self.device} has no TF32 matmuls; the run is plain fp32")
        if (
            MODES[self.mode].compute == "bf16"
            and self.device == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)
        ):
            self.notes.append(f"{self.mode}: this GPU has no native bfloat16; it is emulated, slowly")
        if self.mode == "fp16":
            self.needs_scaler = True
        self._refresh_scaler()

    def _set_tf32(self) -> None:
        """TF32 matmuls on for tf32 mode on GPUs that have them, and off for every other mode (a
        process-wide setting: fp32 must not inherit it from an earlier run or a library).
        :meth:`restore` puts back what was there before."""
        self._tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        capable = torch.cuda.get_device_capability()[0] >= 8
        if self.mode == "tf32" and not capable:
            self.notes.append("tf32: this GPU has no TF32 matmuls (before Ampere); the run is plain fp32")
        on = self.mode == "tf32" and capable
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on

    def restore(self) -> None:
        """Put the process-wide TF32 settings back as they were before this policy."""
        if self._tf32_before is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32_before
            self._tf32_before = None

    def _refresh_scaler(self) -> None:
        if self.needs_scaler and self._scaler is None:
            self._scaler = torch.amp.GradScaler(self.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of most matmuls (float32 when neither autocast nor pure bf16)."""
        if self.mode == "bf16-pure":
            return torch.bfloat16
        return AUTOCAST_DTYPES.get(self.mode, torch.float32)

    def apply(self, model: nn.Module) -> None:
        """Store the model's weights as the global mode says (bf16-pure: all in bfloat16)."""
        if self.mode == "bf16-pure":
            model.to(torch.bfloat16)

    def store_frozen_linears(self, model: nn.Module) -> int:
        """Under autocast, store frozen ``nn.Linear`` weights in the autocast dtype.

        Autocast casts every Linear's weight to the 16-bit dtype at each use, so a frozen
        weight stored already cast computes exactly the same numbers, without the cast on every
        forward pass and with half the memory (autocast also keeps the cast copy alive through
        the backward pass). Weights shared with a module autocast does not cast (an embedding
        tied to the LM head) stay as they are.

        Returns:
            The bytes saved.
        """
        if self.mode not in AUTOCAST_DTYPES:
            return 0
        dtype = AUTOCAST_DTYPES[self.mode]
        other_params = {
            id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)
        }
        saved = 0
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            for p in module.parameters(recurse=False):
                if p.requires_grad or p.dtype != torch.float32 or id(p) in other_params:
                    continue
                saved += p.numel() * (4 - torch.finfo(dtype).bits // 8)
                p.data = p.data.to(dtype)
        return saved

    def keep_fp32_weights(self, model: nn.Module) -> int:
        """Under autocast, store in fp32 every weight read in 16 bits that is not computed in 16 bits.

        A frozen base is read in the autocast dtype (:mod:`ecoadapt.model.load_spec`), which is
        what its matmuls compute in. Two kinds of weight are not: what trains on it (a newly
        initialised head, trained blocks of a 16-bit checkpoint), which the optimizer updates in
        fp32 as autocast's recipe has it; and the weights of everything that is neither a
        ``Linear`` nor an ``Embedding`` (norms, mostly), which autocast computes in fp32: a
        16-bit LayerNorm weight meeting fp32 activations is refused by the CPU kernels
        ("mixed dtype (CPU)"). These are a few values per channel. Tied weights stay tied (the
        tensor is swapped inside its one Parameter).

        Returns:
            The values cast up.
        """
        if self.mode not in AUTOCAST_DTYPES:
            return 0
        matmul = {
            id(p)
            for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Embedding))
            for p in m.parameters(recurse=False)
        }
        cast = 0
        for p in model.parameters():
            if not p.is_floating_point() or p.dtype == torch.float32:
                continue
            if p.requires_grad or id(p) not in matmul:
                p.data = p.data.float()
                cast += p.numel()
        return cast

    def keep_residual_fp32(self, model: nn.Module) -> bool:
        """Under autocast, an input embedding stored in 16 bits (a frozen base read in the
        autocast dtype) hands the blocks fp32 activations, as an fp32 embedding does: the
        residual stream keeps fp32's precision, and the embedding its half-size storage.

        Returns:
            Whether a cast was added.
        """
        get = getattr(model, "get_input_embeddings", None)
        embeddings = get() if callable(get) else None
        weight = getattr(embeddings, "weight", None)
        if self.mode not in AUTOCAST_DTYPES or weight is None or weight.dtype == torch.float32:
            return False
        assert embeddings is not None
        embeddings.register_forward_hook(_to_fp32)
        return True

    def use_fp16_layers(self) -> None:
        """Some layers compute in float16: gradients need dynamic loss scaling."""
        self.needs_scaler = True
        self._refresh_scaler()

    def optimizer_params(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Swap every trainable weight stored below fp32 for an fp32 master copy.

        Args:
            groups: AdamW parameter groups over the model's trainable parameters.

        Returns:
            The same groups, over fp32 tensors the optimizer can update without losing small
            steps; :meth:`step` copies gradients in and rounded weights back.
        """
        self._masters = []
        out = []
        for group in groups:
            params = []
            for p in group["params"]:
                if p.dtype == torch.float32:
                    params.append(p)
                    continue
                master = nn.Parameter(p.detach().float())
                self._masters.append((p, master))
                params.append(master)
            out.append({**group, "params": params})
        return out

    @property
    def masters(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(stored weight, its fp32 master) for every trainable weight stored below fp32."""
        return self._masters

    def scaler_state(self) -> dict[str, Any] | None:
        """The fp16 loss scaler's state (for checkpoints), or None without loss scaling."""
        return self._scaler.state_dict() if self._scaler is not None else None

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        """Restore a :meth:`scaler_state`."""
        if self._scaler is not None and state:
            self._scaler.load_state_dict(state)

    @property
    def master_bytes(self) -> int:
        """Bytes held by fp32 master weights."""
        return sum(m.numel() * 4 for _, m in self._masters)

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

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        max_norm: float | None,
        loss: torch.Tensor | None = None,
    ) -> str:
        """Clip and apply the accumulated gradients (through fp32 masters where there are any).

        A step whose loss or gradient norm is not finite is never applied: weights stay as they
        were. Checking costs one device-host sync per step (fp16's scaler pays it anyway).

        Args:
            optimizer: the optimizer, built over :meth:`optimizer_params`.
            params: the model's trainable parameters (whose gradients backward filled).
            max_norm: gradient clipping threshold, or None.
            loss: the step's loss, checked for NaN and inf along with the gradients (None: the
                gradients alone, as under data parallelism, where they are the same on all
                ranks and losses are not).

        Returns:
            "stepped"; "overflow" when fp16 loss scaling skipped the step (its scale halves:
            the scaler's normal search, counted in skipped_steps); "nonfinite" when the loss or
            the gradients were NaN or inf for another reason (the caller counts those).
        """
        for p, master in self._masters:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # the 16-bit gradient is no longer needed: free it now
        targets = [g for group in optimizer.param_groups for g in group["params"]]
        if self._scaler is None:
            status = self._step_unscaled(optimizer, targets, max_norm, loss)
        else:
            status = self._step_scaled(optimizer, targets, max_norm, loss)
        if status == "stepped" and self._masters:
            with torch.no_grad():
                # Round to the stored dtype in one multi-tensor copy, not one copy per weight:
                # 272 ops fewer a step for SmolLM2 in bf16-pure (bench/step_overhead.py), each
                # a kernel launch on a GPU, where a small model's step is bound by launches.
                torch._foreach_copy_([p for p, _ in self._masters], [master for _, master in self._masters])
        for g in targets:
            g.grad = None
        return status

    @staticmethod
    def _step_unscaled(
        optimizer: torch.optim.Optimizer, targets: list[torch.Tensor], max_norm: float | None, loss: torch.Tensor | None
    ) -> str:
        """Clip and step unless the loss or gradient norm is not finite; one device-host sync."""
        grads = [g.grad for g in targets if g.grad is not None]
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(targets, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        finite = torch.isfinite(norm) if loss is None else torch.isfinite(norm) & torch.isfinite(loss)
        if bool(finite):  # the one sync
            optimizer.step()
            return "stepped"
        return "nonfinite"

    def _step_scaled(
        self,
        optimizer: torch.optim.Optimizer,
        targets: list[torch.Tensor],
        max_norm: float | None,
        loss: torch.Tensor | None,
    ) -> str:
        """fp16: unscale, clip, step through the scaler (which skips inf/NaN), update the scale."""
        assert self._scaler is not None
        self._scaler.unscale_(optimizer)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(targets, max_norm)
        before = self._scaler.get_scale()
        self._scaler.step(optimizer)  # skips the update itself when it found inf/NaN gradients
        self._scaler.update()
        # .get_scale() is a device-host sync; fp16 pays it once per optimizer step.
        if self._scaler.get_scale() < before:
            self.skipped_steps += 1
            # A loss that is itself NaN is not the scale's fault: lowering it will not help.
            return "nonfinite" if loss is not None and not bool(torch.isfinite(loss)) else "overflow"
        return "stepped"

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale, or None without loss scaling."""
        return float(self._scaler.get_scale()) if self._scaler is not None else None

    def summary(self) -> dict[str, Any]:
        """The precision part of summary.json."""
        return {
            "mode": self.mode,
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
            "skipped_steps": self.skipped_steps,
            "loss_scale": self.loss_scale,
            "master_weight_bytes": self.master_bytes,
            "notes": list(self.notes),
        }


def _to_fp32(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: the module's output in fp32 (a module-level function: hooks are pickled
    with the model by torch.compile's and DDP's machinery)."""
    return output.float()
