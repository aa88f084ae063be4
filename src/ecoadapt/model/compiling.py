"""train.compile: torch.compile where it pays, with the seconds it costs counted, never hidden.

Two things can be compiled:

- ``loss``: the element-wise work of the chunked loss (:mod:`ecoadapt.model.losses`): for each chunk
  of logits, the max, the sum of exponentials, the target's logit and the gradient
  ``softmax - one_hot`` in one generated kernel that reads the 16-bit logits once and writes
  the 16-bit gradient once. Eager PyTorch makes five to seven passes over the
  (rows x vocabulary) chunk, with fp32 copies; on a CPU those passes took twice the time of the
  vocabulary projection's matmuls they follow (profile in BENCHMARKS.md).
- ``blocks``: that, and every transformer block (norms, activations and residual additions
  fused around the matmuls).

Compiling runs on the first calls, inside the training window: its seconds and joules are
training's. :class:`CompileClock` reads dynamo's own account of its compile time (forward
graphs when first called, and their backward graphs, which AOTAutograd compiles at the first
backward pass, outside any call we could time), for the summary. Where compiling fails (no
C++ compiler on a CPU, an unsupported op), ``auto`` falls back to eager execution and says so;
an explicit setting stops with the error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ecoadapt.core.errors import UserError

# Steps from which auto compiles the blocks on a CPU: about three times the break-even measured
# on the presets with a cold compile cache (31 to 42 steps; BENCHMARKS.md, bench/compile.py).
AUTO_BLOCKS_FROM_STEPS = 100


def resolve(setting: str | bool, device_type: str, steps: int | None = None, dropout: bool = False) -> str:
    """What train.compile means for a run of ``steps`` steps on ``device_type``: "off", "loss"
    or "blocks" (true: blocks).

    ``auto`` is ``blocks`` on a CPU for runs of at least :data:`AUTO_BLOCKS_FROM_STEPS` steps
    (measured: the compiled blocks win there with compiling counted; shorter runs lose) of a
    model without active ``dropout``, and ``off`` otherwise. Dropout: compiled blocks draw their
    masks from inductor's own random stream, so the run no longer equals its eager twin, and
    an interrupted run did not resume to the same weights (a test caught it); a default must
    not trade either away. GPUs: the saving and the compile time have not been measured there
    yet, and a default must not rest on a guess. The loss kernel alone never won on the presets
    (it needs 16-bit logits to save much), so auto does not choose it.
    """
    if isinstance(setting, bool):
        return "blocks" if setting else "off"
    if setting != "auto":
        return setting
    long_run = steps is not None and steps >= AUTO_BLOCKS_FROM_STEPS
    return "blocks" if device_type == "cpu" and long_run and not dropout else "off"


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training ``model`` draws random masks: a dropout module with p > 0 (LoRA's
    included), or attention dropout in its config."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    try:
        return float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0
    except (TypeError, ValueError):
        return False


@dataclass
class CompileClock:
    """Seconds spent compiling, from the wall time of the calls that compiled a new graph.

    Attributes:
        what: what was asked to compile ("off", "loss", "blocks").
        setting: train.compile as configured ("auto" included; false and true as "off", "blocks").
        seconds: wall seconds of the calls during which dynamo compiled a graph (forward graphs
            only: see :attr:`compile_s` for the whole).
        graphs: graphs compiled.
        fallback: why compiling was abandoned for eager execution (auto only), or None.
    """

    what: str = "off"
    setting: str = "off"
    seconds: float = 0.0
    graphs: int = 0
    fallback: str | None = None
    _dynamo_start: float | None = field(default_factory=lambda: _dynamo_compile_seconds(), repr=False)

    training_s: float | None = None
    _training_start: float | None = field(default=None, repr=False)

    def begin_training(self) -> None:
        """The training window starts: compiling from here on is training's own."""
        self._training_start = _dynamo_compile_seconds()

    def end_training(self) -> None:
        """The training window ends (evaluation compiles its own graphs: kept out)."""
        now = _dynamo_compile_seconds()
        if now is not None and self._training_start is not None and self.what != "off":
            self.training_s = (self.training_s or 0.0) + now - self._training_start

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling since this clock started, forward and backward graphs: dynamo's
        account where it keeps one, else the timed calls (forward graphs only)."""
        now = _dynamo_compile_seconds()
        if now is None or self._dynamo_start is None or self.graphs == 0:
            return self.seconds
        return max(self.seconds, now - self._dynamo_start)

    def timed(self, fn: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (compiled) with its compiling calls timed; ``eager`` after a failure under auto."""

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.fallback is not None:
                return eager(*args, **kwargs)
            before = _graphs_compiled()
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            except Exception as e:  # torch._dynamo wraps backend failures in several types
                if self.setting != "auto" or not _is_compile_failure(e):
                    raise _explained(e) from e
                self.fallback = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                self.seconds += time.perf_counter() - start
                return eager(*args, **kwargs)
            if (new := _graphs_compiled() - before) > 0:
                self.seconds += time.perf_counter() - start
                self.graphs += new
            return out

        return call

    def report(self) -> dict[str, Any]:
        """The ``compile`` part of summary.json."""
        return {
            "setting": self.setting,
            "compiled": self.what if self.fallback is None else "off",
            "compile_s": round(self.compile_s, 3),
            # Of which inside the training window (evaluation's graphs compile in theirs).
            "training_compile_s": None if self.training_s is None else round(self.training_s, 3),
            "graphs": self.graphs,
            "fallback": self.fallback,
            "counted": "compiling runs where the graphs are first used: training's inside training's time and "
            "energy (training_compile_s), evaluation's inside evaluation's",
        }


def _dynamo_compile_seconds() -> float | None:
    """Dynamo's total compile wall time in this process so far (None where it keeps none)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError, TypeError):  # a private API: its absence is no error
        return None


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _is_compile_failure(error: Exception) -> bool:
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or "CppCompileError" in type(error).__name__


def _explained(error: Exception) -> Exception:
    if _is_compile_failure(error):
        return UserError(
            f"train.compile: compiling failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "on a CPU torch.compile needs a C++ compiler (gcc or clang): install one, or set train.compile "
            "to auto (falls back to eager) or off"
        )
    return error


def apply(
    loss_module: Any, blocks: torch.nn.ModuleList, setting: str | bool, device_type: str, steps: int | None = None
) -> CompileClock:
    """Compile what ``setting`` asks for, for a run of ``steps`` steps, on ``loss_module`` (a
    :class:`~ecoadapt.model.losses.LossModule`) and the model's transformer ``blocks``; returns the
    clock the summary reads."""
    from ecoadapt.model import losses

    what = resolve(setting, device_type, steps, has_dropout(loss_module.model))
    clock = CompileClock(what=what, setting=setting if isinstance(setting, str) else what)
    if what == "off":
        return clock
    # Chunks differ in rows (the last one, masked LM's row buckets): one graph for any count.
    fused = torch.compile(losses.softmax_cross_entropy_grad, dynamic=True)
    loss_module.kernel = clock.timed(fused, losses.softmax_cross_entropy_grad)
    if what == "blocks":
        for block in blocks:
            eager_forward = block.forward
            compiled = torch.compile(eager_forward, dynamic=False)
            block.forward = clock.timed(compiled, eager_forward)
    return clock
