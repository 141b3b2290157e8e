"""The native decode kernels: the linear kernel against numpy (in a MindSpore graph and called directly), the
build cache and its failures, the thread pool after fork(), Generator's fallback. The decode blocks are checked
against HF in test_modeling.py and test_generate.py."""

from __future__ import annotations

import ctypes
import multiprocessing as mp

import numpy as np
import pytest

from registry_spec.errors import InputError
from wizardcoder_plugin import kernels
from wizardcoder_plugin.kernels import KernelUnavailable, build, native_kernels

ok, why = kernels.availability()
needs_kernels = pytest.mark.skipif(not ok, reason=f"native kernels unavailable here: {why}")

# (M, K, N): one row and several; K off the vector width, N off the tile width; the tiny model's head
SHAPES = [(1, 256, 384), (3, 100, 37), (8, 768, 3072), (5, 17, 1), (4, 256, 49153), (9, 64, 130)]


@needs_kernels
def test_linear_equals_numpy_in_a_graph():
    import mindspore as ms
    from mindspore import nn

    from wizardcoder_plugin.runtime import init_mindspore

    init_mindspore()

    class Cell(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = native_kernels().linear

        def construct(self, x, w):
            return self.op(x, w)

    rng = np.random.default_rng(0)
    cell = Cell()
    for m, k, n in SHAPES:
        x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
        got = cell(ms.Tensor(x), ms.Tensor(w)).asnumpy()
        assert got.shape == (m, n)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k), err_msg=f"{(m, k, n)}")


@needs_kernels
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_linear_with_bias_equals_numpy(m, k, n):
    assert _call_linear(str(native_kernels().library), m, k, n, seed=m) < 1e-4 * np.sqrt(k)


@needs_kernels
def test_build_is_cached_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path))
    first = build()
    assert first.parent == tmp_path and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert build() == first and first.stat().st_mtime_ns == mtime  # found, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@needs_kernels
def test_compile_error_is_reported_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.cc"
    bad.write_text('extern "C" int Linear( {\n')
    with pytest.raises(KernelUnavailable, match="(?s)compiling broken.cc with .* failed:.*error"):
        build(bad)
    assert list((tmp_path / "cache").iterdir()) == []


@needs_kernels
def test_unwritable_cache_is_reported(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(blocker / "kernels"))  # below a regular file: cannot be created
    with pytest.raises(KernelUnavailable, match="cannot write the kernel cache .*ZOO_KERNEL_CACHE"):
        build()


def test_no_compiler_is_reported(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler"):
        build()


def _call_linear(library: str, m: int, k: int, n: int, seed: int) -> float:
    """Run Linear with a bias through ctypes (MindSpore's calling convention); the max error against numpy."""
    lib = ctypes.CDLL(library)
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    y = np.empty((m, n), dtype=np.float32)
    arrays = [x, w, b, y]
    params = (ctypes.c_void_p * 4)(*[a.ctypes.data for a in arrays])
    shapes = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shape_ptrs = (ctypes.POINTER(ctypes.c_int64) * 4)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64))
                                                          for s in shapes])
    ndims = (ctypes.c_int * 4)(*[a.ndim for a in arrays])
    dtypes = (ctypes.c_char_p * 4)(*[b"float32"] * 4)
    assert lib.Linear(4, params, ndims, shape_ptrs, dtypes, None, None) == 0
    return float(np.abs(y - (x.astype(np.float64) @ w.T + b)).max())


def _child(library: str, queue: mp.Queue) -> None:
    queue.put(_call_linear(library, 4, 512, 4096, seed=2))


@needs_kernels
def test_a_forked_child_can_still_run_the_kernel():
    """The pool's worker threads do not survive fork(); the child must not wait for them."""
    library = str(native_kernels().library)
    assert _call_linear(library, 4, 512, 4096, seed=1) < 1e-3  # the parent's pool has started its workers
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(library, queue))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the kernel")
    assert child.exitcode == 0 and queue.get(timeout=5) < 1e-3


def test_disabled_kernels_fall_back_or_fail_clearly(hf_tiny, monkeypatch):
    from wizardcoder_plugin.config import load_config
    from wizardcoder_plugin.generate import GenerationConfig, Generator
    from wizardcoder_plugin.runtime import build_model

    net = build_model("custom", load_config(hf_tiny / "config.json"), hf_tiny)
    monkeypatch.setenv("ZOO_NATIVE_KERNELS", "0")
    kernels._load.cache_clear()
    try:
        gen = Generator(net, eos_token_id=10**6, pad_token_id=49152, max_batch=1)
        gen.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=2))
        assert gen.head_choice[1] in ("tied", "transposed") and "ZOO_NATIVE_KERNELS=0" in gen.native_unavailable
        forced = Generator(net, eos_token_id=10**6, pad_token_id=49152, max_batch=1, kernels="native")
        with pytest.raises(InputError, match="ZOO_NATIVE_KERNELS=0"):
            forced.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=2))
    finally:
        kernels._load.cache_clear()
    with pytest.raises(InputError, match="unknown kernels"):
        Generator(net, eos_token_id=1, pad_token_id=49152, kernels="fast")


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 7, 96), (2, 300, 256)])  # one thread; the pool
def test_layer_norm_forward_and_backward_equal_torch(shape):
    """The native LayerNorm (used for training on CPU) and its backward against torch autograd."""
    import mindspore as ms
    import torch
    from mindspore import ops

    from wizardcoder_plugin.modeling import Activation, LayerNorm
    from wizardcoder_plugin.runtime import init_mindspore
    from wizardcoder_plugin.train import _native_training_kernels

    init_mindspore()
    rng = np.random.default_rng(4)
    x, dy = (rng.standard_normal(shape, dtype=np.float32) * 3 + 1 for _ in range(2))
    g, b = rng.standard_normal(shape[-1], dtype=np.float32), rng.standard_normal(shape[-1], dtype=np.float32)
    ln = LayerNorm(shape[-1], 1e-5)
    ln.weight.set_data(ms.Tensor(g))
    ln.bias.set_data(ms.Tensor(b))
    ln.native = native_kernels().layer_norm
    grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)
    y = ln(ms.Tensor(x)).asnumpy()
    (dx,), (dg, db) = grad(ln, ms.ParameterTuple(ln.trainable_params()))(ms.Tensor(x), ms.Tensor(dy))
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    ty = torch.nn.functional.layer_norm(tx, (shape[-1],), tg, tb, 1e-5)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=1e-5)
    for ours, ref in ((dx, tx.grad), (dg, tg.grad), (db, tb.grad)):
        np.testing.assert_allclose(ours.asnumpy(), ref.numpy(), rtol=1e-4, atol=1e-4)

    from wizardcoder_plugin.config import PRESETS
    from wizardcoder_plugin.modeling import GPTBigCodeForCausalLM

    net = GPTBigCodeForCausalLM(PRESETS["wizardcoder-tiny"].model_copy(update={"n_layer": 1}))
    assert _native_training_kernels(net)  # the trainer's switch: every LayerNorm and activation of the model
    assert all(c.native is not None for _, c in net.cells_and_names() if isinstance(c, LayerNorm | Activation))


@needs_kernels
@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "gelu"])
def test_gelu_forward_and_backward_equal_torch(name):
    """The native GELU (training on CPU), both forms, against torch autograd; above and below the pool's cutoff."""
    import mindspore as ms
    import torch
    from mindspore import ops

    from wizardcoder_plugin.modeling import Activation
    from wizardcoder_plugin.runtime import init_mindspore

    init_mindspore()
    act = Activation(name)
    act.native = native_kernels().gelu
    grad = ops.GradOperation(sens_param=True)
    rng = np.random.default_rng(7)
    for shape in ((5, 33), (64, 3072)):
        x, dy = rng.standard_normal(shape, dtype=np.float32) * 4, rng.standard_normal(shape, dtype=np.float32)
        tx = torch.tensor(x, requires_grad=True)
        ty = torch.nn.functional.gelu(tx, approximate="tanh" if name != "gelu" else "none")
        ty.backward(torch.tensor(dy))
        np.testing.assert_allclose(act(ms.Tensor(x)).asnumpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
        dx = grad(act)(ms.Tensor(x), ms.Tensor(dy)).asnumpy()
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
