"""Third-party output that says nothing to an ecoadapt user, quietened at its source.

The CLI speaks in one voice: a library's warning or progress bar is filtered where it is made
(its logger, its bar), and what matters in it is said once in ecoadapt's words.

- bitsandbytes, imported on a CPU with AVX512-BF16, logs "Failed to load CPU gemm_4bit_forward
  from kernels-community ... pip install kernels" at every import (peft imports it for every
  LoRA run where it is installed). The portable kernel is used instead; ecoadapt says so once,
  and only when it quantizes.
- transformers' GGUF reader draws an unthrottled bar per tensor; the load's own line
  ("loading ...") says what happens.
- the evaluation harness draws a bar per stage of every task and model; ecoadapt's own lines
  say which task and model are being scored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HINT = "Failed to load CPU gemm_4bit_forward"


class _KernelsHint(logging.Filter):
    """Drops bitsandbytes' kernels hint, remembering that it came."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(KERNELS_HINT):
            _KernelsHint.seen = True
            return False
        return True


_HINT = _KernelsHint()


def quiet_bitsandbytes() -> None:
    """Filter bitsandbytes' kernels hint (before bitsandbytes is imported: the logger is its own)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if _HINT not in logger.filters:
        logger.addFilter(_HINT)


def kernels_note() -> str | None:
    """What the dropped hint meant, in ecoadapt's words (None when it never came)."""
    if not _KernelsHint.seen:
        return None
    return (
        "4-bit matmuls on this CPU use bitsandbytes' portable kernel; its faster AVX512-BF16 kernel "
        "comes with `pip install kernels` (kernels >= 0.11.1)"
    )


@contextlib.contextmanager
def quiet_gguf_conversion() -> Iterator[None]:
    """transformers' GGUF reader without its per-tensor progress bar, for the body."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = gguf_utils.tqdm

    def plain(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        return bar(iterable, *args, **{**kwargs, "disable": True})

    gguf_utils.tqdm = plain
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


@contextlib.contextmanager
def without_bars(*modules: str) -> Iterator[None]:
    """The ``tqdm`` bars that ``modules`` draw (those that import the name ``tqdm``) switched off
    for the body; a module that is not imported, or draws none, is left as it is."""
    import importlib

    patched: list[tuple[Any, Any]] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        bar = getattr(module, "tqdm", None)
        if bar is None:
            continue

        def plain(*args: Any, _bar: Any = bar, **kwargs: Any) -> Any:
            return _bar(*args, **{**kwargs, "disable": True})

        vars(module)["tqdm"] = plain
        patched.append((module, bar))
    try:
        yield
    finally:
        for module, bar in patched:
            vars(module)["tqdm"] = bar
