"""Weights: read HF checkpoints (safetensors, sharded, pytorch_model.bin) and MindSpore .ckpt files in HF or the
reference's mindformers naming, validate every shape against the config, load into the network, and convert
between formats tensor by tensor with atomic writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from registry_spec.errors import InputError, WeightsUnavailableError
from registry_spec.specs import ConvertResult

from .config import GPTBigCodeConfig
from .safetensors_io import bf16_to_f32, f32_to_bf16, iter_tensors, write_tensors

# A lazily materialised tensor: (name, loader returning (array, dtype)); dtype in F32 / F16 / BF16.
LazyTensor = tuple[str, Callable[[], tuple[np.ndarray, str]]]
HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TIED = "lm_head.weight"

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
    "head.head_weight": _TIED,
}
_REF_QKV = re.compile(r"backbone\.blocks\.(\d+)\.attention\.dense([123])\.(weight|bias)")


def _as_dtype(arr: np.ndarray, src: str, dst: str) -> tuple[np.ndarray, str]:
    if dst == "keep" or dst == src:
        return arr, src
    f32 = bf16_to_f32(arr) if src == "BF16" else np.asarray(arr, dtype=np.float32)
    if dst == "F32":
        return f32, "F32"
    if dst == "F16":
        return f32.astype(np.float16), "F16"
    return f32_to_bf16(f32), "BF16"


_DTYPE_NAMES = {"keep": "keep", "fp32": "F32", "fp16": "F16", "bf16": "BF16"}


# ------------------------------------------------------------------------------------------------------ sources
def _hf_safetensors(files: list[Path]) -> Iterator[LazyTensor]:
    for f in files:
        for name, arr, dtype in iter_tensors(f):
            yield name, (lambda a=arr, d=dtype: (a, d))


def _hf_torch_bin(files: list[Path]) -> Iterator[LazyTensor]:
    try:
        import torch
    except ImportError as exc:
        raise InputError("reading pytorch_model.bin needs PyTorch, which is not installed",
                         "pip install torch (CPU build), or convert the checkpoint to safetensors") from exc
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        for name, t in state.items():
            def load(t=t):  # noqa: ANN202
                if t.dtype == torch.bfloat16:
                    return t.view(torch.int16).numpy().view(np.uint16), "BF16"
                dt = {torch.float32: "F32", torch.float16: "F16"}.get(t.dtype)
                if dt is None:
                    return t.float().numpy(), "F32"
                return t.numpy(), dt
            yield name, load


def _ms_ckpt(path: Path) -> Iterator[LazyTensor]:
    import mindspore as ms

    try:
        params = ms.load_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read MindSpore checkpoint {path}: {exc}",
                         "is it a .ckpt written by MindSpore?") from exc
    for name, p in params.items():
        def load(p=p):  # noqa: ANN202
            if p.dtype == ms.bfloat16:
                return f32_to_bf16(p.astype(ms.float32).asnumpy()), "BF16"
            arr = p.asnumpy()
            return arr, {np.float16: "F16"}.get(arr.dtype.type, "F32") if arr.dtype.kind == "f" else "F32"
        yield name, load


def _shard_files(index: Path) -> list[Path]:
    data = json.loads(index.read_text())
    return [index.parent / f for f in dict.fromkeys(data["weight_map"].values())]


def open_source(path: str | Path) -> Iterator[LazyTensor]:
    """Every tensor of an HF directory (any of HF's layouts) or a MindSpore .ckpt, in HF naming."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            raw = _hf_safetensors([p / "model.safetensors"])
        elif (p / "model.safetensors.index.json").is_file():
            raw = _hf_safetensors(_shard_files(p / "model.safetensors.index.json"))
        elif (p / "pytorch_model.bin").is_file():
            raw = _hf_torch_bin([p / "pytorch_model.bin"])
        elif (p / "pytorch_model.bin.index.json").is_file():
            raw = _hf_torch_bin(_shard_files(p / "pytorch_model.bin.index.json"))
        else:
            ckpts = [p / "model.ckpt"] if (p / "model.ckpt").is_file() else sorted(p.glob("*.ckpt"))
            if len(ckpts) == 1:  # a single .ckpt, or a training checkpoint folder
                return to_hf_names(_ms_ckpt(ckpts[0]))
            raise WeightsUnavailableError("model weights", [str(p / f) for f in HF_FILES] + [str(p / "*.ckpt")])
        return to_hf_names(raw)
    if p.is_file() and p.suffix == ".ckpt":
        return to_hf_names(_ms_ckpt(p))
    if p.is_file() and p.suffix == ".safetensors":
        return to_hf_names(_hf_safetensors([p]))
    if p.is_file() and p.suffix == ".bin":
        return to_hf_names(_hf_torch_bin([p]))
    raise WeightsUnavailableError("model weights", [str(p)])


def to_hf_names(tensors: Iterator[LazyTensor]) -> Iterator[LazyTensor]:
    """Rename the reference's mindformers keys (transposing its [in, out] dense weights, fusing q/k/v)."""
    qkv: dict[tuple[str, str], dict[str, Callable]] = {}
    for name, load in tensors:
        if name.startswith(("adam_", "moment", "global_step", "learning_rate", "scale_sense", "current_iterator",
                            "epoch_num", "step_num", "loss_scale", "accu_grads", "kv_cache.")):
            continue  # optimizer / runtime state
        m = _REF_QKV.fullmatch(name)
        if m:
            layer, part, kind = m.groups()
            slot = qkv.setdefault((layer, kind), {})
            slot[part] = load
            if len(slot) == 3:
                def fused(slot=slot):  # noqa: ANN202
                    parts = [slot[k]() for k in "123"]
                    return np.concatenate([a for a, _ in parts], axis=0), parts[0][1]
                yield f"transformer.h.{layer}.attn.c_attn.{kind}", fused
                del qkv[(layer, kind)]
            continue
        block = _REF_BLOCK.fullmatch(name)
        if block and block.group(2) in _REF_BLOCK_NAMES:
            suffix, transpose = _REF_BLOCK_NAMES[block.group(2)]
            new = f"transformer.h.{block.group(1)}.{suffix}"
            if transpose:
                def transposed(load=load):  # noqa: ANN202
                    a, d = load()
                    return np.ascontiguousarray(a.T), d
                yield new, transposed
            else:
                yield new, load
        else:
            yield _REF_GLOBAL_NAMES.get(name, name), load
    if qkv:
        raise InputError(f"incomplete q/k/v (dense1/2/3) tensors for layers {sorted({k[0] for k in qkv})}",
                         "the reference checkpoint is truncated")


def check_against(config: GPTBigCodeConfig, tensors: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped tensor."""
    expected = config.param_shapes()
    problems = []
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected and n != _TIED]
    wrong = [(n, tensors[n], expected[n]) for n in expected if n in tensors and tuple(tensors[n]) != expected[n]]
    if wrong:
        problems.append("shape mismatches: " + "; ".join(f"{n}: checkpoint {tuple(s)} vs model {e}"
                                                        for n, s, e in wrong[:8])
                        + (f" (+{len(wrong) - 8} more)" if len(wrong) > 8 else ""))
    if missing:
        problems.append(f"missing {len(missing)}: " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: " + ", ".join(unexpected[:6])
                        + (" ..." if len(unexpected) > 6 else ""))
    if problems:
        raise InputError(f"weights in {source} do not match the model architecture: " + " | ".join(problems),
                         "pass --config with the checkpoint's config.json (or pick the matching model name)")


def collect(source: str | Path, config: GPTBigCodeConfig) -> dict[str, Callable[[], tuple[np.ndarray, str]]]:
    """Validated lazy tensors of a checkpoint, keyed by HF name, the tied LM head dropped."""
    loaders: dict[str, Callable] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, load in open_source(source):
        loaders[name] = load
    for name, load in loaders.items():
        shapes[name] = tuple(load()[0].shape)  # memory-mapped or already loaded: shape costs no copy
    check_against(config, shapes, str(source))
    loaders.pop(_TIED, None)
    return loaders


def load_into(model: object, loaders: dict[str, Callable[[], tuple[np.ndarray, str]]]) -> None:
    """Set every parameter of a GPTBigCodeForCausalLM from `collect`'s checked tensors, cast to its dtype (the
    parameters may be uninitialized: built under `no_init_parameters`)."""
    import mindspore as ms

    params = {p.name: p for p in model.get_parameters()}  # type: ignore[attr-defined]
    for name, load in loaders.items():
        arr, dtype = load()
        f32 = bf16_to_f32(arr) if dtype == "BF16" else np.asarray(arr, dtype=np.float32)
        param = params[name]
        param.set_data(ms.Tensor(f32, dtype=ms.float32).astype(param.dtype))


# ----------------------------------------------------------------------------------------------------- converting
def convert(source: str | Path, output: str | Path, config: GPTBigCodeConfig, to: str = "ms",
            dtype: str = "keep", progress: bool = True) -> ConvertResult:
    """HF directory / .ckpt -> MindSpore .ckpt (to='ms') or -> HF directory with safetensors + config.json."""
    from tqdm import tqdm

    start = time.perf_counter()
    loaders = collect(source, config)
    order = [n for n in config.param_shapes() if n in loaders]
    target = _DTYPE_NAMES[dtype]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(order), desc=f"convert -> {to}", unit="tensor", disable=not progress, leave=False)
    n_params, dtypes = 0, set()

    def converted() -> Iterator[tuple[str, np.ndarray, str]]:
        nonlocal n_params
        for name in order:
            arr, dt = _as_dtype(*loaders[name](), target)
            n_params += int(arr.size)
            dtypes.add(dt)
            bar.update(1)
            yield name, arr, dt

    if to == "ms":
        if out.suffix != ".ckpt":
            raise InputError(f"output {out} must end in .ckpt for --to ms", "e.g. --output wizardcoder.ckpt")
        _write_ms_ckpt(out, converted())
    else:
        _write_hf_dir(out, converted(), config)
    bar.close()
    return ConvertResult(output=out, direction=f"-> {to}", tensors=len(order), parameters=n_params,
                         dtype="/".join(sorted(dtypes)) or "none", seconds=round(time.perf_counter() - start, 3))


def _write_ms_ckpt(out: Path, tensors: Iterator[tuple[str, np.ndarray, str]]) -> None:
    import mindspore as ms

    entries = []
    for name, arr, dt in tensors:
        if dt == "BF16":
            t = ms.Tensor(bf16_to_f32(arr), dtype=ms.float32).astype(ms.bfloat16)
        else:
            t = ms.Tensor(np.ascontiguousarray(arr))
        entries.append({"name": name, "data": t})
    fd, tmp = tempfile.mkstemp(suffix=".ckpt", dir=out.parent, prefix=f".{out.stem}.")
    os.close(fd)
    try:
        ms.save_checkpoint(entries, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_hf_dir(out: Path, tensors: Iterator[tuple[str, np.ndarray, str]], config: GPTBigCodeConfig) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory", "--to hf writes a checkpoint directory")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        items = list(tensors)
        write_tensors(tmp / "model.safetensors", items)
        torch_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[items[0][2]] if items else "float32"
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict() | {"torch_dtype": torch_dtype}, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
