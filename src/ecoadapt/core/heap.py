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
from collections.abc import Iterator
from typing import Any

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
