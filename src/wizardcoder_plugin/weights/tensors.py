"""A checkpoint tensor known by its header (shape, dtype) and read on demand into an array of its own.

`read` copies the bytes with `preadv` into a fresh array (conversion: the resident set stays at one tensor, where
a mapping would keep every page it touched); `mapped`, where the bytes lie aligned in one range, maps them
copy-on-write (loading: the parameter reads the page cache itself, no copy, as `safetensors` does for PyTorch).
bf16 arrays are `ml_dtypes.bfloat16` (numpy has no bf16; MindSpore and the `safetensors` library take them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

NP_OF = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64, "I64": np.int64,
         "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}
FLOATS = ("F32", "F16", "BF16")
_IO_CHUNK = 1 << 30  # Linux reads at most ~2 GiB per call


@dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    dtype: str  # a safetensors dtype name: F32, F16, BF16, ...
    read: Callable[[], np.ndarray]
    # a copy-on-write view of the file's own bytes where they lie in one aligned range (safetensors), else None
    mapped: Callable[[], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)

    def cast(self, dtype: str) -> LazyTensor:
        """The same tensor converted to a float dtype when read ('keep' or its own dtype: unchanged)."""
        if dtype in ("keep", self.dtype):
            return self
        return LazyTensor(self.shape, dtype, lambda: as_dtype(self.read(), self.dtype, dtype))


def nbytes_of(shape: tuple[int, ...], dtype: str) -> int:
    """The bytes a tensor of `shape` in the safetensors `dtype` takes."""
    return math.prod(shape) * np.dtype(NP_OF[dtype]).itemsize


def file_ranges(path: Path, ranges: list[tuple[int, int]], shape: tuple[int, ...], dtype: str
                ) -> Callable[[], np.ndarray]:
    """A reader of the concatenated byte ranges (offset, length) of `path` as one fresh array."""

    def read() -> np.ndarray:
        out = np.empty(shape, NP_OF[dtype])
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if sum(n for _, n in ranges) != len(buf):
            raise ValueError(f"{path}: {sum(n for _, n in ranges)} bytes for a {dtype} tensor of shape {shape}")
        pos = 0
        with open(path, "rb", buffering=0) as f:
            for offset, length in ranges:
                start, end = pos, pos + length
                while pos < end:
                    got = os.preadv(f.fileno(), [buf[pos:min(end, pos + _IO_CHUNK)]], offset + pos - start)
                    if got <= 0:
                        raise ValueError(f"{path} is truncated (tensor bytes end before offset {offset + length})")
                    pos += got
        return out

    return read


def file_view(path: Path, offset: int, shape: tuple[int, ...], dtype: str) -> Callable[[], np.ndarray] | None:
    """A mapper of `path`'s bytes at `offset` as an array that pages in from the page cache on use and that a
    writer copies page by page (MAP_PRIVATE); None where the offset is not aligned for the dtype."""
    if offset % np.dtype(NP_OF[dtype]).itemsize:
        return None

    def mapped() -> np.ndarray:
        return np.memmap(path, dtype=NP_OF[dtype], mode="c", offset=offset, shape=shape)

    return mapped


def as_dtype(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """A float array in `dst` (F32 / F16 / BF16), copied only when the dtype changes; to bf16 rounds to nearest
    even, as torch does."""
    return arr if dst == src else arr.astype(NP_OF[dst])
