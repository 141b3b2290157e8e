"""Safetensors files read tensor by tensor from their header and written streaming: one file, or HF's shards
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`). Writing holds one tensor at a time, so the
peak memory does not grow with the model.

Not the `safetensors` library: its readers hand out a copy of each tensor (no view of the file's pages, which
`weights.loading` maps into parameters without a copy) and its writers take every tensor at once (no bounded-
memory conversion). MindSpore's own `load_checkpoint(format="safetensors")` maps the file and parses the header
in Python the same way. The tests read this module's files with the library."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from registry_spec.errors import InputError

from .tensors import NP_OF, LazyTensor, file_ranges, file_view

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20


def _bad(path: Path, why: str) -> InputError:
    return InputError(f"{path} is not a valid safetensors file: {why}",
                      "re-download or re-convert the checkpoint (a partial copy is the usual cause)")


def read_header(path: Path) -> tuple[dict, int]:
    """The header (name -> dtype, shape, data_offsets) and where the data starts, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise _bad(path, f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad(path, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {name!r} has no dtype / shape / data_offsets") from None
        if dtype not in NP_OF:
            raise _bad(path, f"tensor {name!r} has unsupported dtype {dtype}")
        if not 0 <= a <= b <= data or b - a != int(np.prod(shape)) * np.dtype(NP_OF[dtype]).itemsize:
            raise _bad(path, f"tensor {name!r}: offsets {a}..{b} do not fit its shape {shape} or the file")
    return header, 8 + n


def lazy_tensors(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    header, start = read_header(path)
    for name, info in header.items():
        if name != "__metadata__":
            a, b = info["data_offsets"]
            shape, dtype = tuple(info["shape"]), info["dtype"]
            yield name, LazyTensor(shape, dtype, file_ranges(path, [(start + a, b - a)], shape, dtype),
                                   file_view(path, start + a, shape, dtype) if b > a else None)


def shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the shard index {index}: {exc}",
                         "it must be HF's index JSON with a 'weight_map'") from None
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{index} names shards that do not exist: {', '.join(missing[:4])}",
                         "copy every shard of the checkpoint")
    return files


def write_file(path: Path, tensors: Sequence[tuple[str, LazyTensor]], metadata: dict[str, str] | None = None,
               done: Callable[[int], None] = lambda nbytes: None) -> None:
    """Write `tensors` to `path` (which the caller makes atomic), reading each one only when its bytes are due."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors:
            arr = np.ascontiguousarray(t.read(), dtype=NP_OF[t.dtype])
            if arr.shape != t.shape:
                raise ValueError(f"{name}: read {arr.shape}, header says {t.shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            done(t.nbytes)
            del arr
        f.flush()
        os.fsync(f.fileno())


def plan_shards(tensors: Sequence[tuple[str, LazyTensor]], max_bytes: int) -> list[list[tuple[str, LazyTensor]]]:
    """HF's greedy split: a new shard when the next tensor would pass `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, LazyTensor]]] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[1].nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1].nbytes
    return shards


def write_sharded(folder: Path, tensors: Sequence[tuple[str, LazyTensor]], max_bytes: int,
                  metadata: dict[str, str] | None = None,
                  done: Callable[[int], None] = lambda nbytes: None) -> list[str]:
    """`model.safetensors`, or shards + index when the tensors pass `max_bytes`; the file names written."""
    shards = plan_shards(tensors, max_bytes)
    if len(shards) == 1:
        write_file(folder / "model.safetensors", tensors, metadata, done)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_file(folder / name, shard, metadata, done)
        weight_map |= {t: name for t, _ in shard}
    total = sum(t.nbytes for _, t in tensors)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*names, INDEX]
