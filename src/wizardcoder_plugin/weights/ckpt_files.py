"""MindSpore .ckpt files read and written without holding the file in memory.

A .ckpt is a run of serialized `Checkpoint` protobuf messages, one `Value {tag, TensorProto {dims, tensor_type,
tensor_content}}` each; MindSpore splits a tensor over 512 MB into several values with the same tag (their contents
concatenate) and may end the file with `crc_num` + 10 bytes. `mindspore.load_checkpoint` parses the whole file
(≈23 s and the file's size again in memory at 1B parameters), so this module skims the message headers and seeks
over the tensor bytes, which `LazyTensor.read` fetches later; the writer emits the same wire format one tensor at a
time. Only the protobuf wire format is hand-written here: varints and length-delimited fields.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from registry_spec.errors import InputError

from .tensors import NP_OF, LazyTensor, file_ranges, nbytes_of

SLICE_BYTES = 512 * 2**20  # MindSpore's SLICE_SIZE (512 * 1024 KB)
MS_TYPES = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Float64": "F64", "Int64": "I64",
            "Int32": "I32", "Int16": "I16", "UInt8": "U8", "Int8": "I8", "Bool": "BOOL"}
TYPE_NAMES = {v: k for k, v in MS_TYPES.items()}


class _Corrupt(Exception):
    pass


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt(f"bad varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, length) of each field in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, 0
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Corrupt(f"field {field} at byte {pos} runs past its message")
            yield field, wire, pos, n
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise _Corrupt(f"unsupported wire type {wire} at byte {pos}")


def _index(buf: mmap.mmap, size: int) -> dict[str, tuple[tuple[int, ...], str, list[tuple[int, int]]]]:
    end = size - 17 if size >= 17 and buf[size - 17:size - 10] == b"crc_num" else size
    found: dict[str, tuple[tuple[int, ...], str, list[tuple[int, int]]]] = {}
    for field, wire, start, n in _fields(buf, 0, end):
        if field != 1 or wire != 2:
            raise _Corrupt(f"unexpected top-level field {field}")
        tag, tensor = None, None
        for f, w, s, m in _fields(buf, start, start + n):
            if f == 1 and w == 2:
                tag = bytes(buf[s:s + m]).decode()
            elif f == 2 and w == 2:
                tensor = (s, m)
            elif f == 3:
                raise _Corrupt("map tensors (maptensor values) are not supported")
        if tag is None or tensor is None:
            raise _Corrupt(f"a value at byte {start} has no tag or no tensor")
        dims: list[int] = []
        type_name, content = "", (0, 0)
        for f, w, s, m in _fields(buf, tensor[0], tensor[0] + tensor[1]):
            if f == 1 and w == 0:
                dims.append(s)
            elif f == 1 and w == 2:  # packed dims
                pos = s
                while pos < s + m:
                    d, pos = _varint(buf, pos, s + m)
                    dims.append(d)
            elif f == 2 and w == 2:
                type_name = bytes(buf[s:s + m]).decode()
            elif f == 3 and w == 2:
                content = (s, m)
        if tag in found:
            found[tag][2].append(content)
        else:
            found[tag] = (tuple(dims), type_name, [content])
    return found


def lazy_tensors(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    """Every tensor of a .ckpt (non-tensor values such as strings are skipped) from one pass over its headers."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            entries = _index(buf, size)
    except (_Corrupt, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read MindSpore checkpoint {path}: {exc}",
                         "is it an unencrypted .ckpt written by MindSpore, copied completely?") from None
    for tag, (dims, type_name, ranges) in entries.items():
        dtype = MS_TYPES.get(type_name)
        if dtype is None:
            continue  # strings and other non-numeric values (MindSpore's append_dict)
        nbytes = nbytes_of(dims, dtype)
        if sum(n for _, n in ranges) != nbytes:
            raise InputError(f"cannot read MindSpore checkpoint {path}: {tag} holds {sum(n for _, n in ranges)} "
                             f"bytes for a {type_name} tensor of shape {dims}", "the file is damaged")
        yield tag, LazyTensor(dims, dtype, file_ranges(path, ranges, dims, dtype))


def _key(field: int, wire: int) -> bytes:
    return _encode(field << 3 | wire)


def _encode(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _value_header(tag: str, dims: tuple[int, ...], type_name: str, content: int) -> bytes:
    tensor = b"".join(_key(1, 0) + _encode(d) for d in dims)
    tensor += _key(2, 2) + _encode(len(type_name)) + type_name.encode() + _key(3, 2) + _encode(content)
    value = _key(1, 2) + _encode(len(tag.encode())) + tag.encode() + _key(2, 2) + _encode(len(tensor) + content)
    value += tensor
    return _key(1, 2) + _encode(len(value) + content) + value


def write_file(path: Path, tensors: Sequence[tuple[str, LazyTensor]],
               done: Callable[[int], None] = lambda nbytes: None, slice_bytes: int = SLICE_BYTES) -> None:
    """Write a .ckpt that `mindspore.load_checkpoint` reads, one tensor in memory at a time (the caller makes the
    write atomic); tensors over `slice_bytes` are split along their first axis as MindSpore does."""
    with open(path, "wb") as f:
        for name, t in tensors:
            arr = np.ascontiguousarray(t.read(), dtype=NP_OF[t.dtype])
            pieces = np.array_split(arr, -(-arr.nbytes // slice_bytes)) if arr.nbytes > slice_bytes else [arr]
            for piece in pieces:
                data = memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
                f.write(_value_header(name, t.shape, TYPE_NAMES[t.dtype], len(data)))
                f.write(data)
            done(t.nbytes)
            del arr, pieces
