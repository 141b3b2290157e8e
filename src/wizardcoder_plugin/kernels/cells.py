"""The seam where the native CPU kernels enter the network: substitutes for `model.inference`'s prefill and decode
cells that replace their hook methods (norm, dense, blocks, the LM head's matmul, the greedy pick), the two
factories `selection` builds the engine's cells through, and for training (through `training`) the LayerNorm and
GELU kernels, a linear layer's backward, the per-token loss, the gradient norm and the AdamW update."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..model.inference import DecodeCell, KVCache, PrefillCell
from ..model.modeling import Activation, Dense, LayerNorm
from ..training.optim import AdamW, SquaredNorm, TokenNLL

if TYPE_CHECKING:
    from ..model.modeling import GPTBigCodeForCausalLM
    from . import NativeKernels

Screen = tuple[Parameter, Parameter]  # the LM head's int8 screening copy: Q [V,E], info [V,3] (kernels/head.py)


class _NativeHead:
    """The LM head on the native small-row linear kernel and, given `screen`, greedy ids [B] int64 from the screened
    head (GreedyHead in native/head.cc): the fp32 argmax at a quarter of the bytes."""

    def attach(self, native: NativeKernels, screen: Screen | None) -> None:
        self.native = native
        self.head_linear = native.linear
        # a ParameterTuple, so the cell lists them: a graph loaded from the compile cache binds only the cell's
        # listed parameters (a plain tuple left them unbound there: garbage tokens)
        self.screen = None if screen is None else ParameterTuple(screen)
        cfg = self.model.config
        self.native_meta = Tensor(np.array([cfg.layer_norm_epsilon, cfg.activation_function == "gelu"],
                                           dtype=np.float32))

    def screened_token(self, hidden: Tensor) -> Tensor:
        """Final LayerNorm and the screened greedy head: [B,E] -> token ids [B] int64."""
        tr = self.model.transformer
        return self.native.greedy_head(hidden, tr.ln_f.weight, tr.ln_f.bias, tr.wte.weight, self.screen[0],
                                       self.screen[1], self.native_meta)


class NativePrefillCell(_NativeHead, PrefillCell):
    """MindSpore's MatMul stays and what surrounds it runs on the native kernels: LayerNorm, bias + residual,
    bias + GELU, one pass each instead of MindSpore's 2-6 elementwise kernels (a large share of a small model's
    prefill). The native linear kernel, faster alone for a few dozen rows, made the whole prefill slower."""

    def __init__(self, model: GPTBigCodeForCausalLM, cache: KVCache, head_t: Parameter | None,
                 native: NativeKernels, screen: Screen | None = None) -> None:
        PrefillCell.__init__(self, model, cache, head_t)
        self.attach(native, screen)
        self.matmul_t = ops.MatMul(transpose_b=True)

    def norm(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return self.native.layer_norm(x, w, b, self.model.transformer.ln_f.eps)  # the config's epsilon

    def dense(self, x: Tensor, w: Tensor, b: Tensor, residual: Tensor | None = None, act: bool = False) -> Tensor:
        shape = x.shape
        y = self.matmul_t(x.reshape(-1, shape[-1]), w)
        if act:
            y = self.native.bias_gelu(y, b, self.model.transformer.h[0].mlp.act.meta)
        elif residual is not None:
            y = self.native.bias_add(y, b, residual)
        else:
            y = self.native.bias_add(y, b)
        return y.reshape(shape[:-1] + (y.shape[-1],))

    def out(self, hidden: Tensor) -> Tensor:
        if self.screen is not None:
            return self.screened_token(hidden)
        return super().out(hidden)


class NativeDecodeCell(_NativeHead, DecodeCell):
    """Each block is one native call (DecodeLayer in native/linear.cc) that also writes the block's new key and
    value into the caches in place, at each row's position: MindSpore passes a Parameter's own memory to a Custom
    op, and nothing else reads these caches within the step."""

    def __init__(self, model: GPTBigCodeForCausalLM, cache: KVCache, greedy: bool, head_t: Parameter | None,
                 native: NativeKernels, screen: Screen | None = None) -> None:
        DecodeCell.__init__(self, model, cache, greedy, head_t)
        self.attach(native, screen if greedy else None)

    def blocks(self, hidden: Tensor, positions: Tensor) -> Tensor:
        hidden = hidden.reshape(hidden.shape[0], -1)
        for i, block in enumerate(self.model.transformer.h):
            attn, mlp = block.attn, block.mlp
            hidden = self.native.decode_layer(hidden, block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight,
                                              attn.c_attn.bias, self.keys[i], self.values[i], positions,
                                              attn.c_proj.weight, attn.c_proj.bias, block.ln_2.weight,
                                              block.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight,
                                              mlp.c_proj.bias, self.native_meta)
        return hidden

    def pick(self, hidden: Tensor) -> Tensor:
        if self.screen is not None:
            return self.screened_token(hidden)
        return super().pick(hidden)


def prefill_cell(model: GPTBigCodeForCausalLM, cache: KVCache, head_t: Parameter | None = None,
                 native: NativeKernels | None = None, screen: Screen | None = None) -> PrefillCell:
    """The prefill graph of `cache`, on the native kernels where `native` is given."""
    if native is None:
        return PrefillCell(model, cache, head_t)
    return NativePrefillCell(model, cache, head_t, native, screen)


def decode_cell(model: GPTBigCodeForCausalLM, cache: KVCache, greedy: bool = False, head_t: Parameter | None = None,
                native: NativeKernels | None = None, screen: Screen | None = None) -> DecodeCell:
    """The decode step of `cache`, on the native kernels where `native` is given (`screen`: greedy steps only)."""
    if native is None:
        return DecodeCell(model, cache, greedy, head_t)
    return NativeDecodeCell(model, cache, greedy, head_t, native, screen)


class NativeLayerNorm(nn.Cell):
    """A LayerNorm's kernel on the native one (fp32): the same math, with a backward an order of magnitude faster
    than MindSpore's LayerNormGrad on CPU."""

    def __init__(self, op: Callable) -> None:
        super().__init__()
        self.op = op

    def construct(self, x: Tensor, w: Tensor, b: Tensor, meta: Tensor) -> Tensor:
        return self.op(x, w, b, meta)


class NativeGelu(nn.Cell):
    """An activation's kernel on the native GELU: one pass forward and one backward, in fp32."""

    def __init__(self, op: Callable) -> None:
        super().__init__()
        self.op = op

    def construct(self, x: Tensor, meta: Tensor) -> Tensor:
        return self.op(x.astype(ms.float32), meta).astype(x.dtype)


def use_native_training_kernels(model: GPTBigCodeForCausalLM, native: NativeKernels) -> None:
    """Every LayerNorm and MLP activation of `model` on the native CPU kernels, forward and backward: for training
    on CPU, before its graphs compile."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, LayerNorm):
            cell.kernel = NativeLayerNorm(native.layer_norm)
        elif isinstance(cell, Activation):
            cell.kernel = NativeGelu(native.gelu)


class NativeBackwardDense(Dense):
    """ops.dense(x [M,K], W [N,K], b) (MindSpore's MatMul forward) whose backward is one native call
    (kernels.NativeKernels.linear_backward: a packed GEMM for dx and dW, and db, in fp32), which beats MindSpore's
    CPU MatMul on the backward products of some shapes by up to 2x. Same math, other rounding order; the trainer
    times it against the others per shape."""

    def __init__(self, backward: Callable) -> None:
        super().__init__()
        self.backward = backward

    def bprop(self, x: Tensor, w: Tensor, b: Tensor, out: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dx, dw, db = self.backward(x, w, dout)  # a Custom op's outputs are a list; a bprop must return a tuple
        return dx, dw, db


class NativeTokenNLL(TokenNLL):
    """The per-token losses and their gradient in one native pass (CrossEntropyForward/Backward)."""

    def __init__(self, op: Callable) -> None:
        super().__init__()
        self.op = op

    def construct(self, logits: Tensor, labels: Tensor) -> Tensor:
        nll, _ = self.op(logits, labels.astype(ms.int32))
        return nll


class NativeSquaredNorm(SquaredNorm):
    """Each tensor's squares summed in one native pass, with float64 partials."""

    def __init__(self, op: Callable) -> None:
        super().__init__()
        self.op = op

    def construct(self, grads: tuple) -> Tensor:
        running = ops.zeros((1,), ms.float32)
        for g in grads:
            running = self.op(g, running)
        return running.reshape(())


class NativeAdamW(AdamW):
    """Each fp32 parameter's whole update as one native pass (AdamWStep: torch's formula; p, m and v written and
    the accumulator zeroed in place), instead of MindSpore's decay, scaling, ApplyAdam and reset."""

    def __init__(self, params: ParameterTuple, accum: ParameterTuple, beta1: float, beta2: float, eps: float,
                 weight_decay: float, op: Callable) -> None:
        super().__init__(params, accum, beta1, beta2, eps, weight_decay)
        self.step = op
        self.eps_t = Tensor(eps, ms.float32)
        self.decay_t = tuple(Tensor(np.array([d], np.float32)) for d in self.decay)

    def construct(self, lr: Tensor, grad_coef: Tensor, bc1: Tensor, bc2: Tensor) -> Tensor:
        hyper = ops.stack((lr, grad_coef, bc1, bc2, self.beta1, self.beta2, self.eps_t))
        out = ops.zeros((1,), ms.float32)
        for i in range(len(self.params)):
            out = ops.depend(out, self.step(self.params[i], self.m[i], self.v[i], self.accum[i], hyper,
                                            self.decay_t[i]))
        return out.sum()


def adamw(params: ParameterTuple, accum: ParameterTuple, beta1: float, beta2: float, eps: float,
          weight_decay: float, native: NativeKernels | None = None) -> AdamW:
    """The optimizer update: native where `native` is given and every parameter is fp32 (no master copies)."""
    if native is not None and all(p.dtype == ms.float32 for p in params):
        return NativeAdamW(params, accum, beta1, beta2, eps, weight_decay, native.adamw_step)
    return AdamW(params, accum, beta1, beta2, eps, weight_decay)
