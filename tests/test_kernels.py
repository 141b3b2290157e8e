"""The native kernels: the linear kernel against numpy (in a MindSpore graph and called directly), the screened
greedy head against the exact argmax (ties, near ties, flat rows), the prefill epilogues, LayerNorm, GELU, the
linear layers' backward and the cross-entropy against torch, the build cache and its failures, the thread pool
after fork(), Generator's fallback. The decode layers and the prefill are checked against HF in test_modeling.py
and test_generate.py."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

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

    from wizardcoder_plugin.model.runtime import init_mindspore

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
    """Built ahead by the command scripts/setup.sh runs, found (not rebuilt) by the first run."""
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "wizardcoder_plugin.kernels", "build"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    first = Path(done.stdout.split()[0])
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
        build([bad])
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
    done = subprocess.run([sys.executable, "-m", "wizardcoder_plugin.kernels", "build"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "no C++ compiler" in done.stderr and "hint: install g++" in done.stderr


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
    from registry_spec.generation import GenerationConfig
    from wizardcoder_plugin.generation.online import Generator
    from wizardcoder_plugin.model.config import load_config
    from wizardcoder_plugin.model.runtime import build_model

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

    from wizardcoder_plugin.kernels.cells import NativeGelu, NativeLayerNorm
    from wizardcoder_plugin.kernels.training import TrainingKernels
    from wizardcoder_plugin.model.modeling import Activation, LayerNorm
    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    rng = np.random.default_rng(4)
    x, dy = (rng.standard_normal(shape, dtype=np.float32) * 3 + 1 for _ in range(2))
    g, b = rng.standard_normal(shape[-1], dtype=np.float32), rng.standard_normal(shape[-1], dtype=np.float32)
    ln = LayerNorm(shape[-1], 1e-5)
    ln.weight.set_data(ms.Tensor(g))
    ln.bias.set_data(ms.Tensor(b))
    ln.kernel = NativeLayerNorm(native_kernels().layer_norm)
    grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)
    y = ln(ms.Tensor(x)).asnumpy()
    (dx,), (dg, db) = grad(ln, ms.ParameterTuple(ln.trainable_params()))(ms.Tensor(x), ms.Tensor(dy))
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    ty = torch.nn.functional.layer_norm(tx, (shape[-1],), tg, tb, 1e-5)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=1e-5)
    for ours, ref in ((dx, tx.grad), (dg, tg.grad), (db, tb.grad)):
        np.testing.assert_allclose(ours.asnumpy(), ref.numpy(), rtol=1e-4, atol=1e-4)

    from wizardcoder_plugin.model.config import PRESETS
    from wizardcoder_plugin.model.modeling import GPTBigCodeForCausalLM

    net = GPTBigCodeForCausalLM(PRESETS["wizardcoder-tiny"].model_copy(update={"n_layer": 1}))
    assert TrainingKernels(net, 8).native  # the trainer's switch: every LayerNorm and activation of the model
    assert all(isinstance(c.kernel, NativeLayerNorm | NativeGelu) for _, c in net.cells_and_names()
               if isinstance(c, LayerNorm | Activation))


@needs_kernels
@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "gelu"])
def test_gelu_forward_and_backward_equal_torch(name):
    """The native GELU (training on CPU), both forms, against torch autograd; above and below the pool's cutoff."""
    import mindspore as ms
    import torch
    from mindspore import ops

    from wizardcoder_plugin.kernels.cells import NativeGelu
    from wizardcoder_plugin.model.modeling import Activation
    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    act = Activation(name)
    act.kernel = NativeGelu(native_kernels().gelu)
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


def _greedy_head(hidden: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """GreedyHead in a graph: ids [B] for LN_f(hidden) . weight^T (unit LN weight, zero or given bias)."""
    import mindspore as ms
    from mindspore import nn

    from wizardcoder_plugin.kernels.head import greedy_tables
    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    q, info = greedy_tables(weight, native_kernels())
    e = weight.shape[1]

    class Cell(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = native_kernels().greedy_head
            self.args = [ms.Tensor(a) for a in (np.ones(e, np.float32), np.zeros(e, np.float32) if bias is None
                                                 else bias, weight, q, info, np.array([1e-5], np.float32))]

        def construct(self, h):
            return self.op(h, *self.args)

    return Cell()(ms.Tensor(hidden)).asnumpy()


def _ln(h: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    h = h.astype(np.float64)
    x = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    return x if bias is None else x + bias


@needs_kernels
@pytest.mark.parametrize("v, e, b", [(49153, 256, 1), (49153, 256, 8), (1000, 37, 3), (5003, 768, 5)])
def test_greedy_head_is_the_exact_argmax(v, e, b):
    """The screened head (int8 screen, fp32 re-score) picks the float64 argmax of the logits, one row and several,
    E off the vector width, V off the tile width; token ids int64 like ArgMaxWithValue."""
    rng = np.random.default_rng(v + e + b)
    w = (rng.standard_normal((v, e)) * 0.02).astype(np.float32)
    for bias in (None, rng.standard_normal(e).astype(np.float32)):  # ln_f's bias shifts every hidden row
        h = rng.standard_normal((b, e)).astype(np.float32)
        got = _greedy_head(h, w, bias)
        assert got.dtype == np.int64 and got.shape == (b,)
        np.testing.assert_array_equal(got, (_ln(h, bias) @ w.T.astype(np.float64)).argmax(-1))


@needs_kernels
def test_greedy_head_resolves_near_ties_and_flat_rows():
    """Where the int8 screen cannot separate rows, they are re-scored in fp32: a winner 1e-5 above its rival
    (far inside the screen's error), an exact tie (the first index wins, like torch), a flat distribution (every
    row survives: scored in full), and zero logits (the first row)."""
    rng = np.random.default_rng(11)
    v, e = 4096, 256
    w = (rng.standard_normal((v, e)) * 0.02).astype(np.float32)
    h = rng.standard_normal((1, e)).astype(np.float32)
    x = _ln(h)[0]
    best = int((x @ w.T.astype(np.float64)).argmax())
    for trial in range(8):  # a rival row of another direction scoring 1e-5 above or below: the int8 copies'
        near = w.copy()     # error (~1e-2) orders the two at random, only the fp32 re-score separates them
        delta = 1e-5 * (1 if trial % 2 else -1)
        r = rng.standard_normal(e) * 0.02
        rival = w[best] + r - (x @ r - delta) * x / (x @ x)
        near[3000] = rival.astype(np.float32)
        scores = x @ near.T.astype(np.float64)
        assert abs(scores[3000] - scores[best] - delta) < 2e-6
        assert _greedy_head(h, near)[0] == (3000 if delta > 0 else best), trial
    tie, other = w.copy(), 0 if best > 0 else 1
    tie[other] = w[best]
    assert _greedy_head(h, tie)[0] == min(best, other)
    flat = np.tile(w[:1], (v, 1))
    flat[2222] = w[0] * (1 + 1e-4) if float(x @ w[0]) > 0 else w[0] * (1 - 1e-4)
    assert _greedy_head(h, flat)[0] == 2222
    assert _greedy_head(np.full((1, e), 3.0, np.float32), w)[0] == 0  # LN of a constant: all logits 0


def _reference_tables(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The screen's tables as kernels/head.py defines them, in numpy float64."""
    w = weight.astype(np.float64)
    gamma = w.shape[1] * 2.0**-24 / (1 - w.shape[1] * 2.0**-24)
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    q = np.clip(np.rint(w / np.where(scale > 0, scale, 1).astype(np.float64)[:, None]), -127, 127)
    w_hat = q * scale.astype(np.float64)[:, None]
    c1 = np.linalg.norm(w - w_hat, axis=1) + gamma * np.linalg.norm(w, axis=1)
    c2 = np.linalg.norm(w_hat, axis=1)
    return q.astype(np.int8), np.stack([scale, c1 * (1 + 1e-6), c2 * (1 + 1e-6)], axis=1)


@needs_kernels
@pytest.mark.parametrize("v, e", [(5003, 768), (7, 37), (1, 1)])
def test_greedy_tables_equal_their_definition_and_refuse_non_finite_weights(v, e):
    """Q and the scales exactly as defined; the bounds at or above their float64 values and within 1e-6 of them;
    rows of zeros and rows exactly on a level's half-way point (rint: half to even) included."""
    from wizardcoder_plugin.kernels.head import greedy_tables

    rng = np.random.default_rng(v * e)
    w = (rng.standard_normal((v, e)) * 0.02).astype(np.float32)
    if v > 2:
        w[1] = 0
        w[2] = (np.arange(e) % 126 + 0.5) / 128  # with max 127/128 the scale is 1/128: every value a half level
        w[2, 0] = 127 / 128
    q, info = greedy_tables(w, native_kernels())
    want_q, want_info = _reference_tables(w)
    assert q.dtype == np.int8 and info.dtype == np.float32 and info.shape == (v, 3)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(info[:, 0], want_info[:, 0].astype(np.float32))
    assert (info[:, 1:].astype(np.float64) >= want_info[:, 1:] * (1 - 1e-12)).all()
    np.testing.assert_allclose(info[:, 1:], want_info[:, 1:], rtol=1e-6, atol=0)
    w[v // 2, e // 2] = np.inf
    assert greedy_tables(w, native_kernels()) is None
    w[v // 2, e // 2] = np.nan
    assert greedy_tables(w, native_kernels()) is None


@needs_kernels
@pytest.mark.parametrize("exact", [False, True])
def test_bias_add_and_bias_gelu_equal_numpy(exact):
    """The prefill's one-pass epilogues: y + b, y + b + residual, GELU(y + b) (tanh and erf forms)."""
    import mindspore as ms
    import torch

    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    nk = native_kernels()
    rng = np.random.default_rng(5)
    for rows, n in ((3, 7), (256, 3072)):
        y, r = (rng.standard_normal((rows, n), dtype=np.float32) * 3 for _ in range(2))
        b = rng.standard_normal(n, dtype=np.float32)
        np.testing.assert_allclose(nk.bias_add(ms.Tensor(y), ms.Tensor(b)).asnumpy(), y + b, atol=1e-6)
        np.testing.assert_allclose(nk.bias_add(ms.Tensor(y), ms.Tensor(b), ms.Tensor(r)).asnumpy(), y + b + r,
                                   atol=1e-5)
        meta = ms.Tensor(np.array([exact], np.float32))
        want = torch.nn.functional.gelu(torch.tensor(y + b), approximate="none" if exact else "tanh").numpy()
        np.testing.assert_allclose(nk.bias_gelu(ms.Tensor(y), ms.Tensor(b), meta).asnumpy(), want, rtol=1e-5,
                                   atol=1e-5)


@needs_kernels
def test_native_adamw_step_equals_the_mindspore_update():
    """AdamWStep (one in-place pass per parameter) against the ApplyAdam path over three steps: parameters and
    both moments, with decay on the matrix only and bias correction; the accumulators are zeroed."""
    from mindspore import Parameter, ParameterTuple, Tensor

    from wizardcoder_plugin.kernels.cells import NativeAdamW, adamw
    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    rng = np.random.default_rng(9)
    shapes = {"h.0.attn.c_attn.weight": (40, 33), "h.0.attn.c_attn.bias": (40,)}
    start = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}

    def run(native):
        params = ParameterTuple(Parameter(Tensor(v.copy()), name=n) for n, v in start.items())
        accum = ParameterTuple(Parameter(Tensor(np.zeros(s, np.float32)), name=f"acc.{n}") for n, s in shapes.items())
        opt = adamw(params, accum, 0.9, 0.95, 1e-6, 0.1, native)
        assert isinstance(opt, NativeAdamW) == (native is not None)
        grads = np.random.default_rng(3)
        for t in range(1, 4):
            for a in accum:
                a.set_data(Tensor(grads.standard_normal(a.shape, dtype=np.float32)))
            bc1, bc2 = 1 - 0.9**t, 1 - 0.95**t
            opt(*(Tensor(np.float32(x)) for x in (1e-2, 0.5, bc1, bc2))).asnumpy()
            assert all(not a.asnumpy().any() for a in accum)
        return [x.asnumpy() for x in (*params, *opt.m, *opt.v)]

    for ours, ref in zip(run(native_kernels()), run(None), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_sum_squares_equals_float64():
    """GradStats' native pass: the squared L2 norm over several tensors (one below the pool's cutoff, one odd-sized
    above it) against float64."""
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor

    from wizardcoder_plugin.kernels.cells import NativeSquaredNorm
    from wizardcoder_plugin.model.runtime import init_mindspore
    from wizardcoder_plugin.training.optim import GradStats

    init_mindspore()
    rng = np.random.default_rng(13)
    grads = [rng.standard_normal(s, dtype=np.float32) for s in ((7,), (301, 257), (3, 5, 11))]
    accum = ParameterTuple(Parameter(Tensor(g), name=f"g{i}") for i, g in enumerate(grads))
    want = sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)
    ours = float(GradStats(accum, None, NativeSquaredNorm(native_kernels().sum_squares))().asnumpy())
    plain = float(GradStats(accum, None)().asnumpy())
    assert abs(ours - want) <= 1e-6 * want and abs(plain - want) <= 1e-4 * want
    assert ms.get_context("mode") == ms.GRAPH_MODE


@needs_kernels
@pytest.mark.parametrize("m,k,n", [(6, 100, 7), (37, 45, 50), (100, 300, 33), (29, 513, 70)])
def test_linear_backward_equals_torch(m, k, n):
    """NativeBackwardDense (the trainer's native backward of a linear layer): dx, dW, db against torch autograd,
    on shapes off every tile size (rows, columns and the inner dimension past one packed block: K 513 > 256,
    M 300 rows for dW), one below the pool's cutoff."""
    import torch
    from mindspore import Tensor

    from wizardcoder_plugin.kernels.cells import NativeBackwardDense
    from wizardcoder_plugin.model.modeling import DenseGrad
    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    rng = np.random.default_rng(21)
    x, w, b, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (n, k), (n,), (m, n)))
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    torch.nn.functional.linear(tx, tw, tb).backward(torch.tensor(dy))
    got = DenseGrad(NativeBackwardDense(native_kernels().linear_backward))(*(Tensor(a) for a in (x, w, b, dy)))
    for ours, ref in zip(got, (tx.grad, tw.grad, tb.grad), strict=True):
        np.testing.assert_allclose(ours.asnumpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("rows,vocab", [(6, 37), (64, 1000), (16, 49153)])
def test_cross_entropy_equals_torch(rows, vocab):
    """The native per-token loss and its gradient (the trainer's on CPU) against torch's cross_entropy, with
    ignored labels (-100) and large logits; a batch with no labelled token gives 0, not NaN."""
    import mindspore as ms
    import torch
    from mindspore import Tensor, nn, ops

    from wizardcoder_plugin.kernels.cells import NativeTokenNLL
    from wizardcoder_plugin.model.runtime import init_mindspore
    from wizardcoder_plugin.training.optim import causal_lm_loss

    init_mindspore()
    rng = np.random.default_rng(22)
    logits = (rng.standard_normal((2, rows // 2, vocab)) * 8).astype(np.float32)
    labels = rng.integers(0, vocab, size=(2, rows // 2)).astype(np.int32)
    labels[0, 1] = labels[1, -1] = -100

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.nll = NativeTokenNLL(native_kernels().cross_entropy)

        def construct(self, x, y):
            return causal_lm_loss(x, y, self.nll)

    loss_cell = Loss()
    loss = float(loss_cell(Tensor(logits), Tensor(labels)).asnumpy())
    grad = ops.GradOperation()(loss_cell)(Tensor(logits), Tensor(labels)).asnumpy()
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t.reshape(-1, vocab), torch.tensor(labels.reshape(-1), dtype=torch.long))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert not grad[0, 1].any() and not grad[1, -1].any()
    none = np.full((1, 4), -100, np.int32)
    assert float(loss_cell(Tensor(np.zeros((1, 4, 9), np.float32)), Tensor(none)).asnumpy()) == 0.0
    assert ms.get_context("mode") == ms.GRAPH_MODE


@needs_kernels
@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86-64 targets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_avx2_and_portable_builds_pass_the_kernel_tests(march, tmp_path):
    """The AVX2+FMA path (-march=haswell, the ISA of the benchmark issue's EPYC machines) and the plain C path
    (-march=x86-64) built with ZOO_KERNEL_MARCH: this file's numeric tests and the decode/prefill cells against
    HF, in a process of their own (the library is loaded once per process)."""
    import os

    env = {**os.environ, "ZOO_KERNEL_MARCH": march, "ZOO_KERNEL_CACHE": str(tmp_path)}
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_kernels.py"),
         str(tests / "test_modeling.py::test_prefill_and_decode_cells_equal_full_forward"),
         "-k", "(greedy or linear or bias_add or adamw or sum_squares or layer_norm or gelu or native or cross_entropy)"
         " and not builds"],
        env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert len(list(tmp_path.glob("native-*.so"))) == 1  # built for that target, not found in the default cache


def test_fastest_call_stops_at_its_budget_after_two_rounds():
    """A probe of slow calls stops after two rounds (one in each order) once more would pass its budget; fast
    calls take every round; without a budget every round runs."""
    import time

    from wizardcoder_plugin.kernels.choices import fastest_call

    class Out:
        def asnumpy(self) -> None:
            return None

    def counting(delay: float) -> tuple[list[int], object]:
        count = [0]

        def cell(*_: object) -> Out:
            count[0] += 1
            time.sleep(delay)
            return Out()
        return count, cell

    slow, slow_cell = counting(0.01)
    fastest_call({"slow": slow_cell}, (), rounds=4, calls=4, budget_s=0.05)
    assert slow[0] == 1 + 2 * 5  # its first call, then two rounds of a warm-up and 4 timed calls
    fast, fast_cell = counting(0.0)
    fastest_call({"fast": fast_cell}, (), rounds=4, calls=4, budget_s=10.0)
    unbounded, unbounded_cell = counting(0.01)
    fastest_call({"x": unbounded_cell}, (), rounds=4, calls=4)
    assert fast[0] == unbounded[0] == 1 + 4 * 5


@needs_kernels
@pytest.mark.parametrize("large", [False, True])
def test_head_probe_times_a_large_head_on_one_instance(large, tmp_path, monkeypatch):
    """The LM head's layout probe: two compiled instances per candidate and four calls a round for a small head,
    one instance and two calls for a head over LARGE_HEAD_BYTES; the winner is one of the candidates and is
    remembered, so the next probe times nothing."""
    from wizardcoder_plugin.kernels import choices
    from wizardcoder_plugin.model.config import GPTBigCodeConfig
    from wizardcoder_plugin.model.modeling import GPTBigCodeForCausalLM
    from wizardcoder_plugin.model.runtime import init_mindspore

    init_mindspore()
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path))
    if large:
        monkeypatch.setattr(choices, "LARGE_HEAD_BYTES", 0)
    seen: list[tuple[list, int]] = []
    real = choices.fastest_call

    def recording(cells, args, **kw):
        seen.append((sorted(cells), kw["calls"]))
        return real(cells, args, **kw)

    monkeypatch.setattr(choices, "fastest_call", recording)
    net = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=1024, n_embd=64, n_layer=1, n_head=4))
    winner = choices.head_layout(net, 1, ["native", "tied"], native_kernels(), lambda: None)
    instances = 1 if large else 2
    assert seen == [(sorted((n, i) for n in ("native", "tied") for i in range(instances)), 2 if large else 4)]
    assert winner in ("native", "tied")
    assert choices.head_layout(net, 1, ["native", "tied"], native_kernels(), lambda: None) == winner
    assert len(seen) == 1  # cached: not timed again


def test_a_thread_count_that_is_not_one_is_refused_not_ignored(monkeypatch):
    """The pool would silently fall back to every CPU on ZOO_KERNEL_THREADS=abc or 0."""
    for bad in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("ZOO_KERNEL_THREADS", bad)
        with pytest.raises(InputError, match="not a positive whole number"):
            kernels._build_and_wrap()
