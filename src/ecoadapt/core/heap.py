"""The C heap's freed pages: handed back to the system where glibc's allocator would keep them.

glibc serves a large block from its own heap, not from a fresh mapping, once a block of that size
has been freed (its mmap threshold rises to the largest block freed, up to 32 MiB). A load that
reads and frees a copy of every tensor, or a 4-bit layer that dequantizes its weight into a new
block at every pass, then leaves freed blocks in the heap's free lists, where they count in the
resident set and raise the peak (0.4-0.5 GiB of a 1.1B model's NF4 load, measured).

Both calls here go to the C library already in the process (``ctypes.CDLL(None)``): no
``find_library``, which would run ``ldconfig -p`` in a child process while the model is loaded.
On a C library without them (musl, macOS) they do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # PyTorch's own switch (read once, when torch first allocates)
M_TRIM_THRESHOLD = -1  # mallopt's parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MAPPED_FROM_BYTES = 128 * 1024  # glibc's own starting threshold: blocks above it get their own mapping
STEADY_MMAP_BYTES = 32 * 1024 * 1024  # the highest the threshold would rise to by itself (64-bit glibc)


@functools.cache
def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 (present in glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed() -> None:
    """Hand the heap's freed pages back to the system (``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def large_blocks_mapped() -> Iterator[None]:
    """Inside, every block above 128 KiB gets its own mapping, returned to the system when freed
    (the threshold does not rise); on the way out the freed pages are handed back and the
    threshold is fixed at 32 MiB, the highest glibc's own would rise to (it no longer adjusts):
    blocks below it come from the heap, as they do in a process that has freed blocks that large.
    Keeping 128 KiB for training instead cost 28% more CPU time (bench/results/qlora-heap.json)."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MAPPED_FROM_BYTES)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * STEADY_MMAP_BYTES)
        release_freed()


def huge_pages_for_torch() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``: every
    tensor of 2 MiB or more is ``madvise``d ``MADV_HUGEPAGE``), unless the variable is set already
    (a user's ``0`` is kept). Only a process that has not imported torch yet can still ask:
    ``adapt`` asks for a quantized base, before it imports torch; a sweep's points and torchrun's
    ranks are such processes too.

    Why a quantized base: on a CPU, bitsandbytes dequantizes every 4-bit weight into a new block
    at every pass, and how much of that glibc keeps resident varies from run to run (the 1.1B NF4
    run's training peak: 1.64-1.82 GiB without huge pages, 1.51-1.58 with, at the same time per
    step: bench/huge_pages.py, BENCHMARKS.md). A run without a quantized base is left as it was.

    Returns:
        whether the variable asks for them (what torch's allocator read, if it was set before
        torch was imported).
    """
    if "torch" not in sys.modules:
        os.environ.update(with_huge_pages(os.environ))
    return os.environ.get(TORCH_HUGE_PAGES) == "1"


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with huge pages asked for, as :func:`huge_pages_for_torch` asks (a value already
    there is kept): the environment of a child that will load a quantized base (plan's trial steps)."""
    return {**env, TORCH_HUGE_PAGES: env.get(TORCH_HUGE_PAGES, "1")}
