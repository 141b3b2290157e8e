"""Checkpoints against the architecture (from the headers, before anything big exists) and MindSpore parameters
to and from files: a parameter keeps the mapped file pages or the one array read for it (`from_numpy` shares it),
so a load peaks at the weights, not twice them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from registry_spec.errors import InputError

from ..model.config import GPTBigCodeConfig
from . import safetensors_files
from .sources import TIED, open_source, raw_tensors
from .tensors import NP_OF, LazyTensor, as_dtype

if TYPE_CHECKING:
    from mindspore import Parameter
    from mindspore.nn import Cell


def _listed(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_against(config: GPTBigCodeConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one error naming the missing, unexpected and mis-shaped tensors and the architecture in use."""
    expected = config.param_shapes()
    problems = []
    wrong = [f"{n}: checkpoint {tuple(shapes[n])} vs model {e}" for n, e in expected.items()
             if n in shapes and tuple(shapes[n]) != e]
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected and n != TIED]
    if wrong:
        problems.append(f"shape mismatches: {'; '.join(wrong[:8])}" + (f" (+{len(wrong) - 8} more)"
                                                                       if len(wrong) > 8 else ""))
    if missing:
        problems.append(f"missing {len(missing)}: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listed(unexpected)}")
    if problems:
        arch = (f"n_layer={config.n_layer}, n_embd={config.n_embd}, n_head={config.n_head}, "
                f"vocab_size={config.vocab_size}, n_positions={config.n_positions}")
        raise InputError(f"weights in {source} do not match the model architecture ({arch}): "
                         + " | ".join(problems),
                         "pass --config with the checkpoint's config.json (or pick the matching model name)")


def collect(source: str | Path, config: GPTBigCodeConfig) -> dict[str, LazyTensor]:
    """The checkpoint's model tensors keyed by HF name, checked from the headers (no tensor read), tied head
    dropped."""
    tensors = dict(open_source(source))
    for name, t in tensors.items():
        if t.dtype not in ("F32", "F16", "BF16"):
            raise InputError(f"{source}: {name} is {t.dtype}, not a float tensor",
                             "model weights must be fp32, fp16 or bf16")
    check_against(config, {n: t.shape for n, t in tensors.items()}, str(source))
    tensors.pop(TIED, None)
    return tensors


def _ms_dtype_name(param: Parameter) -> str:
    import mindspore as ms

    return {ms.float32: "F32", ms.float16: "F16", ms.bfloat16: "BF16"}[param.dtype]


def set_param(param: Parameter, t: LazyTensor, map_files: bool = True) -> None:
    """`t` as `param`'s storage in the parameter's dtype: the file's pages themselves where they can be mapped
    (`map_files`), else an array read for it."""
    import mindspore as ms

    target = _ms_dtype_name(param)
    if t.dtype == target and t.mapped is not None and map_files:
        data = ms.from_numpy(t.mapped())  # the page cache's bytes: no copy, nothing allocated until written
    else:
        data = ms.from_numpy(np.ascontiguousarray(as_dtype(t.read(), t.dtype, target)))
    param.set_data(data)


def load_into(model: Cell, tensors: dict[str, LazyTensor], map_files: bool = True) -> None:
    """Set every parameter of a GPTBigCodeForCausalLM from `collect`'s checked tensors (the parameters may be
    uninitialized: built under `no_init_parameters`). Mapped parameters keep their file open: a checkpoint
    rewritten in place (not replaced by a rename, as every writer here does) would change them."""
    params = {p.name: p for p in model.get_parameters()}
    for name, t in tensors.items():
        set_param(params[name], t, map_files)


def param_tensor(param: Parameter) -> LazyTensor:
    """A parameter as a LazyTensor of its own dtype."""
    dtype = _ms_dtype_name(param)

    def read() -> np.ndarray:
        # MindSpore hands bf16 out as its own numpy bfloat16 type: the same bits as the weights' package's one
        return param.asnumpy().view(NP_OF[dtype])

    return LazyTensor(tuple(param.shape), dtype, read)


def save_params(params: Iterable[Parameter], path: Path, done: Callable[[int], None] = lambda nbytes: None,
                sync_every: int | None = None) -> None:
    """MindSpore parameters to one safetensors file (`mindspore.load_checkpoint(path, format="safetensors")` reads
    it too), a tensor at a time (`done` and `sync_every`: `safetensors_files.write_file`'s); the caller makes the
    write atomic."""
    safetensors_files.write_file(path, [(p.name, param_tensor(p)) for p in params], {"format": "ms"}, done,
                                 sync_every)


def load_params(params: Iterable[Parameter], path: Path) -> None:
    """Set `params` from a file `save_params` (or MindSpore's save_checkpoint) wrote: every name present, every
    shape equal."""
    saved = dict(raw_tensors(path))
    for p in params:
        name, shape = p.name, tuple(p.shape)
        if name not in saved:
            raise InputError(f"checkpoint {path} has no tensor {name!r}", "resume from a checkpoint of this run")
        if saved[name].shape != shape:
            raise InputError(f"checkpoint {path}: {name} has shape {saved[name].shape}, the model needs {shape}",
                             "resume with the same model config")
        set_param(p, saved[name], map_files=False)  # training writes every parameter: copy now, not per page
