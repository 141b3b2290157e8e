"""Streaming safetensors read/write with numpy, bf16 included (numpy has no bf16: it travels as uint16 bits)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

NP_OF = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
         "I32": np.int32, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def iter_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (name, array, safetensors dtype) lazily from a memory map; BF16 arrays are uint16 bit patterns."""
    path = Path(path)
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dtype = info["dtype"]
        if dtype not in NP_OF:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        yield name, mm[start + a: start + b].view(NP_OF[dtype]).reshape(info["shape"]), dtype


def write_tensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray, str]],
                  metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time (two passes over a re-iterable: shapes first, then data)."""
    items = list(tensors)  # (name, lazy array, dtype): arrays are materialised one by one below
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr, dtype in items:
        size = int(np.prod(arr.shape)) * np.dtype(NP_OF[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr, dtype in items:
            f.write(np.ascontiguousarray(arr, dtype=NP_OF[dtype]).tobytes())
