"""Every tensor of a checkpoint, lazily and in HF naming: HF folders (safetensors, sharded, pytorch_model.bin),
single files, MindSpore .ckpt / .safetensors in HF or the reference's mindformers naming."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from registry_spec.errors import InputError, WeightsUnavailableError

from . import ckpt_files, safetensors_files
from .tensors import NP_OF, LazyTensor

HF_FILES = ("model.safetensors", safetensors_files.INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
TIED = "lm_head.weight"
# optimizer and runtime state in MindSpore and mindformers checkpoints: not model weights
STATE_PREFIXES = ("adam_", "moment", "global_step", "learning_rate", "scale_sense", "current_iterator", "epoch_num",
                  "step_num", "loss_scale", "accu_grads", "kv_cache.")

# the reference's (mindformers research/wizardcoder) names -> HF names. Its dense weights for attention.projection
# and both MLP matrices are stored [in, out] (transposed); q/k/v are split into dense1/2/3.
_REF_BLOCK = re.compile(r"backbone\.blocks\.(\d+)\.(.+)")
_REF_BLOCK_NAMES: dict[str, tuple[str, bool]] = {
    "layernorm1.gamma": ("ln_1.weight", False), "layernorm1.beta": ("ln_1.bias", False),
    "layernorm2.gamma": ("ln_2.weight", False), "layernorm2.beta": ("ln_2.bias", False),
    "attention.projection.weight": ("attn.c_proj.weight", True),
    "attention.projection.bias": ("attn.c_proj.bias", False),
    "output.mapping.weight": ("mlp.c_fc.weight", True), "output.mapping.bias": ("mlp.c_fc.bias", False),
    "output.projection.weight": ("mlp.c_proj.weight", True), "output.projection.bias": ("mlp.c_proj.bias", False),
}
_REF_GLOBAL_NAMES = {
    "backbone.layernorm.gamma": "transformer.ln_f.weight", "backbone.layernorm.beta": "transformer.ln_f.bias",
    "backbone.embedding.word_embedding.embedding_table": "transformer.wte.weight",
    "backbone.embedding.position_embedding.embedding_table": "transformer.wpe.weight",
    "head.head_weight": TIED,
}
_REF_QKV = re.compile(r"backbone\.blocks\.(\d+)\.attention\.dense([123])\.(weight|bias)")


def raw_tensors(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    """The tensors of one file under their stored names."""
    if path.suffix == ".ckpt":
        return ckpt_files.lazy_tensors(path)
    if path.suffix == ".safetensors":
        return safetensors_files.lazy_tensors(path)
    if path.suffix == ".bin":
        return _torch_bin(path)
    raise WeightsUnavailableError("model weights (.safetensors, .ckpt or .bin)", [str(path)])


def _torch_bin(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    try:
        import torch
    except ImportError as exc:
        raise InputError("reading pytorch_model.bin needs PyTorch, which is not installed",
                         "pip install torch (CPU build), or convert the checkpoint to safetensors") from exc
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, t in state.items():
        def read(t: torch.Tensor = t) -> np.ndarray:
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(NP_OF["BF16"]).copy()
            return (t.numpy() if t.dtype in names else t.float().numpy()).copy()
        yield name, LazyTensor(tuple(t.shape), names.get(t.dtype, "F32"), read)


def _files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    if p.is_dir():
        for single, index in (("model.safetensors", safetensors_files.INDEX),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (p / single).is_file():
                return [p / single]
            if (p / index).is_file():
                return safetensors_files.shard_files(p / index)
        for name in ("model.ckpt",):  # a training checkpoint folder from before safetensors checkpoints
            if (p / name).is_file():
                return [p / name]
        ckpts = sorted(p.glob("*.ckpt"))
        if len(ckpts) == 1:
            return ckpts
    raise WeightsUnavailableError("model weights", [str(p / f) for f in HF_FILES] + [str(p / "*.ckpt")]
                                  if p.is_dir() else [str(p)])


def open_source(path: str | Path) -> Iterator[tuple[str, LazyTensor]]:
    """Every model tensor of an HF folder (any of HF's layouts), a training checkpoint folder or one weights file,
    in HF naming."""
    def every() -> Iterator[tuple[str, LazyTensor]]:
        for f in _files(Path(path)):
            yield from raw_tensors(f)
    return to_hf_names(every())


def to_hf_names(tensors: Iterator[tuple[str, LazyTensor]]) -> Iterator[tuple[str, LazyTensor]]:
    """Rename the reference's mindformers keys (transposing its [in, out] dense weights, fusing q/k/v); drop
    optimizer state."""
    qkv: dict[tuple[str, str], dict[str, LazyTensor]] = {}
    for name, t in tensors:
        if name.startswith(STATE_PREFIXES):
            continue
        m = _REF_QKV.fullmatch(name)
        if m:
            layer, part, kind = m.groups()
            slot = qkv.setdefault((layer, kind), {})
            slot[part] = t
            if len(slot) == 3:
                parts = [slot[k] for k in "123"]
                shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
                yield (f"transformer.h.{layer}.attn.c_attn.{kind}",
                       LazyTensor(shape, parts[0].dtype, lambda ps=parts: np.concatenate([p.read() for p in ps])))
                del qkv[(layer, kind)]
            continue
        block = _REF_BLOCK.fullmatch(name)
        if block and block.group(2) in _REF_BLOCK_NAMES:
            suffix, transpose = _REF_BLOCK_NAMES[block.group(2)]
            new = f"transformer.h.{block.group(1)}.{suffix}"
            if transpose:
                yield new, LazyTensor(t.shape[::-1], t.dtype, lambda t=t: np.ascontiguousarray(t.read().T))
            else:
                yield new, t
        else:
            yield _REF_GLOBAL_NAMES.get(name, name), t
    if qkv:
        raise InputError(f"incomplete q/k/v (dense1/2/3) tensors for layers {sorted({k[0] for k in qkv})}",
                         "the reference checkpoint is truncated")
