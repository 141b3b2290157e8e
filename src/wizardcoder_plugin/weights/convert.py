"""`zoo convert`: a checkpoint to a MindSpore checkpoint (.safetensors, or .ckpt for mindformers' tools) or to an
HF folder (config.json + safetensors, sharded with HF's index past `max_shard_size`), streaming: one tensor in
memory at a time, the output written under a temporary name and renamed into place."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from registry_spec.atomic import atomic_path, staged_files
from registry_spec.errors import InputError
from registry_spec.specs import ConvertResult

from ..model.config import GPTBigCodeConfig
from . import ckpt_files, safetensors_files
from .loading import collect

DTYPE_NAMES = {"keep": "keep", "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """HF's max_shard_size spelling: '5GB', '500MB', '2GiB' or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m:
        raise InputError(f"cannot read the size {text!r}", "write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def convert(source: str | Path, output: str | Path, config: GPTBigCodeConfig, to: str = "ms",
            dtype: str = "keep", max_shard_size: str = "5GB", progress: bool = True) -> ConvertResult:
    """HF folder / MindSpore checkpoint -> MindSpore .safetensors or .ckpt (to='ms') or an HF folder (to='hf')."""
    from tqdm import tqdm

    start = time.perf_counter()
    out = Path(output)
    if to == "ms" and out.suffix not in (".safetensors", ".ckpt"):
        raise InputError(f"output {out} must end in .safetensors or .ckpt for --to ms",
                         "e.g. --output wizardcoder.safetensors (.ckpt for mindformers' tools)")
    if to == "hf" and out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory", "--to hf writes a checkpoint directory")
    shard_bytes = parse_size(max_shard_size)
    tensors = collect(source, config)
    items = [(n, tensors[n].cast(DTYPE_NAMES[dtype])) for n in config.param_shapes() if n in tensors]
    total = sum(t.nbytes for _, t in items)
    bar = tqdm(total=total, desc=f"convert -> {to}", unit="B", unit_scale=True, disable=not progress, leave=False)
    if to == "ms":
        with atomic_path(out) as tmp:
            if out.suffix == ".ckpt":
                ckpt_files.write_file(tmp, items, bar.update)
            else:
                safetensors_files.write_file(tmp, items, {"format": "ms"}, bar.update)
    else:
        _write_hf_dir(out, items, config, shard_bytes, bar.update)
    bar.close()
    return ConvertResult(output=out, direction=f"-> {to}", tensors=len(items),
                         parameters=sum(math.prod(t.shape) for _, t in items),
                         dtype="/".join(sorted({t.dtype for _, t in items})) or "none",
                         seconds=round(time.perf_counter() - start, 3))


def _write_hf_dir(out: Path, items: list, config: GPTBigCodeConfig, shard_bytes: int, done: object) -> None:
    with staged_files(out) as tmp:
        written = safetensors_files.write_sharded(tmp, items, shard_bytes, {"format": "pt"}, done)  # type: ignore
        torch_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[items[0][1].dtype] if items else \
            "float32"
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict() | {"torch_dtype": torch_dtype}, indent=2))
        # an earlier conversion's weights (another shard count) would shadow or confuse the new ones
        for old in [*out.glob("model*.safetensors"), out / safetensors_files.INDEX]:
            if old.name not in written and old.exists():
                old.unlink()
