"""Safetensors files read through the `safetensors` library's header parser and mapped tensor by tensor, and
written streaming: one file, or HF's shards (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`).

The library reads and checks each header (`safe_open`); the tensors are then views of the file's pages (what
`weights.loading` maps into parameters without a copy), because the library's own readers hand out a copy of
each tensor and do not expose the offsets (safetensors#569). Its writers take every tensor of a file at once, so
writing is this module's: one tensor in memory at a time. The ratios are in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from registry_spec.errors import InputError

from .tensors import NP_OF, LazyTensor, file_ranges, file_view, nbytes_of

INDEX = "model.safetensors.index.json"


def _bad(path: Path, why: str) -> InputError:
    return InputError(f"{path} is not a valid safetensors file: {why}",
                      "re-download or re-convert the checkpoint (a partial copy is the usual cause)")


def _entries(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of each tensor in the file's order, as the library reads and checks the header."""
    try:
        with safe_open(path, framework="numpy") as f:
            slices = [(name, f.get_slice(name)) for name in f.offset_keys()]
            entries = [(name, s.get_dtype(), tuple(s.get_shape())) for name, s in slices]
    except SafetensorError as exc:
        raise _bad(path, str(exc).removeprefix("Error while deserializing header: ")) from None
    for name, dtype, _ in entries:
        if dtype not in NP_OF:
            raise _bad(path, f"tensor {name!r} has unsupported dtype {dtype}")
    return entries


def lazy_tensors(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    entries = _entries(path)
    sizes = [nbytes_of(shape, dtype) for _, dtype, shape in entries]
    # the library refuses gaps, overlaps and trailing bytes: the data is the file's last sum(sizes) bytes, in order
    offset = path.stat().st_size - sum(sizes)
    for (name, dtype, shape), nbytes in zip(entries, sizes, strict=True):
        yield name, LazyTensor(shape, dtype, file_ranges(path, [(offset, nbytes)], shape, dtype),
                               file_view(path, offset, shape, dtype) if nbytes else None)
        offset += nbytes


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


_datasync = getattr(os, "fdatasync", os.fsync)  # (macOS has no fdatasync)


def write_file(path: Path, tensors: Sequence[tuple[str, LazyTensor]], metadata: dict[str, str] | None = None,
               done: Callable[[int], None] = lambda nbytes: None, sync_every: int | None = None) -> None:
    """Write `tensors` to `path` (which the caller makes atomic), reading each one only when its bytes are due;
    `done` after each. With `sync_every`, what is written is flushed to disk every that many bytes, so that no
    `done` waits longer than that takes, the closing fsync included (left to the kernel, gigabytes may be dirty
    then; flushing as it goes took 1.6× as long at 1B, RESULTS.md)."""
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
        unsynced = 0
        for name, t in tensors:
            arr = np.ascontiguousarray(t.read(), dtype=NP_OF[t.dtype])
            if arr.shape != t.shape:
                raise ValueError(f"{name}: read {arr.shape}, header says {t.shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr
            unsynced += t.nbytes
            if sync_every is not None and unsynced >= sync_every:
                f.flush()
                _datasync(f.fileno())
                unsynced = 0
            done(t.nbytes)
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
