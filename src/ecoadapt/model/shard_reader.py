"""Large tensors read from a safetensors shard a band of rows at a time, straight into the dtype
the model keeps them in.

transformers materializes each tensor whole in its stored dtype, then converts it: a 262k-word
embedding stored in fp32 (a GGUF file's converted folder, :mod:`ecoadapt.model.gguf_cache`) is
671 MB read for a 336 MB bf16 weight, both alive at once, and that transient set Gemma 3 270M's
load peak. Here the destination is allocated once in the target dtype and filled from a reused
buffer of at most :data:`BAND_BYTES` read with ``pread``: the transient is one band. The
safetensors layout is public and simple (an 8-byte little-endian header size, a JSON header
naming each tensor's dtype, shape and byte range, then the data), so the byte range of a band
of rows is known without reading the rest.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

BAND_BYTES = 32 << 20  # read buffer per band (bytes): small beside the tensors it pays off for
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def header(path: str) -> tuple[int, dict[str, Any]]:
    """(byte offset where the shard's data begins, its JSON header) of a safetensors file, read
    once per version of the file: a shard saved again at the same path is read again."""
    stat = os.stat(path)
    return _header(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _header(path: str, mtime_ns: int, size: int) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def read_as(path: str | Path, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Tensor ``name`` of the shard at ``path`` in ``dtype``, read band by band; None where there is
    nothing to gain (not a float tensor, already ``dtype``, or smaller than two bands) and the
    caller reads it whole as before.

    Values are those of ``tensor.to(dtype)`` on the whole tensor: each band is converted by the
    same rounding, elementwise.
    """
    start, entries = header(str(path))
    entry = entries.get(name)
    stored = DTYPES.get(entry["dtype"]) if entry else None
    if entry is None or stored is None or stored == dtype or not dtype.is_floating_point or not entry["shape"]:
        return None
    begin, end = entry["data_offsets"]
    shape = list(entry["shape"])
    if end - begin < 2 * BAND_BYTES or shape[0] < 2:
        return None
    row_bytes = (end - begin) // shape[0]
    rows = max(1, BAND_BYTES // row_bytes)
    out = torch.empty(shape, dtype=dtype)
    buffer = bytearray(rows * row_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        for first in range(0, shape[0], rows):
            count = min(rows, shape[0] - first)
            view = memoryview(buffer)[: count * row_bytes]
            _pread_into(fd, view, start + begin + first * row_bytes)
            band = torch.frombuffer(view, dtype=stored).view(count, *shape[1:])
            out[first : first + count].copy_(band)
    finally:
        os.close(fd)
    return out


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (pread may return fewer bytes than asked)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{fd}: the safetensors shard ended early (truncated file?)")
        done += n


class NamedShard:
    """A safetensors handle whose slices remember their file and name (for a banded read)."""

    def __init__(self, handle: Any, path: str) -> None:
        self._handle, self._path = handle, path

    def get_slice(self, name: str) -> NamedSlice:
        return NamedSlice(self._handle.get_slice(name), self._path, name)

    def __getattr__(self, attribute: str) -> Any:  # keys, get_tensor, metadata ...
        return getattr(self._handle, attribute)

    def __enter__(self) -> NamedShard:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)


class NamedSlice:
    """A safetensors slice, with the file and tensor name it came from."""

    def __init__(self, inner: Any, path: str, name: str) -> None:
        self._inner, self.path, self.name = inner, path, name

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._inner[index]

    def __getattr__(self, attribute: str) -> Any:  # get_shape, get_dtype
        return getattr(self._inner, attribute)
