"""The GPTBigCode (StarCoder / WizardCoder) network in MindSpore, written with `ops` primitives.

Parameter names equal HF's checkpoint keys (`transformer.h.0.attn.c_attn.weight`, ...), so HF safetensors load
one to one. Multi-query attention keeps HF's layout: the fused `c_attn` rows are [query (H*d) | key (d) | value (d)],
and queries are folded to [B, S*H, d] so every matmul is a 3-D batched matmul (4-D broadcasting ones fail on CPU).

Three entry points share the same blocks:
- `GPTBigCodeForCausalLM.construct(input_ids, position_ids, attention_mask)`: the cache-free full forward
  (training, parity checks, the no-cache generation path);
- `inference.PrefillCell` / `inference.DecodeCell` (sharing one `KVCache`): incremental inference with
  per-layer key and value caches held as Parameters and updated in place with ScatterUpdate, so a decode step
  moves no cache through the host; on CPU the decode step's blocks can run on native kernels (`kernels/native/`,
  the same math in C++).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from .config import GPTBigCodeConfig

_DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
MASK_MIN = float(np.finfo(np.float32).min)


def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x [..., in] W^T + b with HF's [out, in] weight layout."""
    shape = x.shape
    y = ops.dense(x.reshape(-1, shape[-1]).astype(w.dtype), w, b)
    return y.reshape(shape[:-1] + (y.shape[-1],))


class Linear(nn.Cell):
    """y = x W^T + b with HF's [out, in] weight layout. The trainer may set `dense` to a `ChunkedBackwardDense` or
    a `NativeBackwardDense` (the same product, another backward)."""

    def __init__(self, in_features: int, out_features: int, init_range: float, dtype: ms.Type) -> None:
        super().__init__()
        self.weight = Parameter(initializer(Normal(init_range), (out_features, in_features), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), dtype), name="bias")
        self.dense = None

    def construct(self, x: Tensor) -> Tensor:
        if self.dense is None:
            return linear(x, self.weight, self.bias)
        shape = x.shape
        y = self.dense(x.reshape(-1, shape[-1]).astype(self.weight.dtype), self.weight, self.bias)
        return y.reshape(shape[:-1] + (y.shape[-1],))


class Dense(nn.Cell):
    """ops.dense(x [M,K], W [N,K], b) as a cell, with autodiff's backward."""

    def construct(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return ops.dense(x, w, b)


class ChunkedBackwardDense(Dense):
    """ops.dense(x [M,K], W [N,K], b) whose backward splits the K axis into `chunks` products: dx = dy W and
    dW = dy^T x read W and x as row-major right operands of K columns, which MindSpore's CPU MatMul (oneDNN) runs
    at a fraction of its speed for some shapes (the MLP's at tiny_starcoder's size ran about twice as fast in two
    chunks). The results are identical; the trainer times both once per shape and keeps the faster."""

    def __init__(self, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.matmul_ta = ops.MatMul(transpose_a=True)

    def bprop(self, x: Tensor, w: Tensor, b: Tensor, out: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = w.shape[1]
        bounds = [k * j // self.chunks for j in range(self.chunks + 1)]
        dx = ops.concat([ops.matmul(dout, ops.narrow(w, 1, bounds[j], bounds[j + 1] - bounds[j]))
                         for j in range(self.chunks)], axis=1)
        dw = ops.concat([self.matmul_ta(dout, ops.narrow(x, 1, bounds[j], bounds[j + 1] - bounds[j]))
                         for j in range(self.chunks)], axis=1)
        return dx, dw, dout.sum(0)


class DenseGrad(nn.Cell):
    """(dx, dW, db) of `dense` (a Dense, ChunkedBackwardDense or kernels.cells.NativeBackwardDense) for the
    sensitivity dy: what the trainer times to choose between them."""

    def __init__(self, dense: Dense) -> None:
        super().__init__()
        self.fn = dense
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.grad(self.fn)(x, w, b, dy)


class LayerNormKernel(nn.Cell):
    """MindSpore's LayerNorm over the last axis: (x, weight, bias, meta [eps]) -> y, the signature a substitute
    kernel (kernels.cells) shares."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x: Tensor, w: Tensor, b: Tensor, meta: Tensor) -> Tensor:
        return self.norm(x, w, b)[0]


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, always computed in fp32 by `kernel` (MindSpore's unless the trainer
    substitutes one before the graphs using it compile)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (hidden,), ms.float32), name="bias")
        self.kernel = LayerNormKernel(eps)
        self.eps = Tensor(np.array([eps], dtype=np.float32))

    def construct(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.weight, self.bias)

    def normalize(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """x normalized with this layer's epsilon and kernel and the weight and bias `w`, `b`."""
        return self.kernel(x.astype(ms.float32), w.astype(ms.float32), b.astype(ms.float32), self.eps).astype(x.dtype)


class GeluKernel(nn.Cell):
    """GELU, (x, meta [exact]) -> y: the exact erf form, or the tanh form computed as x * sigmoid(2z),
    z = sqrt(2/pi) (x + 0.044715 x^3), which equals 0.5 x (1 + tanh z) (HF's `gelu_pytorch_tanh`) to fp32
    rounding: MindSpore's fused CPU GeLU kernel is 4-5x slower than these five elementwise kernels on
    [rows, 4*hidden] activations, in the forward and the backward."""

    def __init__(self, exact: bool) -> None:
        super().__init__()
        self.exact = exact
        self.inv_sqrt2 = 1.0 / math.sqrt(2.0)
        self.c1 = 2.0 * math.sqrt(2.0 / math.pi)
        self.c3 = self.c1 * 0.044715

    def construct(self, x: Tensor, meta: Tensor) -> Tensor:
        if self.exact:
            return 0.5 * x * (1.0 + ops.erf(x * self.inv_sqrt2))
        return x * ops.sigmoid(x * (self.c1 + self.c3 * (x * x)))


class Activation(nn.Cell):
    """The MLP activation the config names (tanh-approximate GELU or the exact erf form), computed by `kernel`
    (MindSpore's unless the trainer substitutes one before the graphs using it compile)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.exact = name == "gelu"
        self.kernel = GeluKernel(self.exact)
        self.meta = Tensor(np.array([self.exact], dtype=np.float32))

    def construct(self, x: Tensor) -> Tensor:
        return self.kernel(x, self.meta)


class Dropout(nn.Cell):
    """Dropout active only in training mode and only when p > 0 (a compile-time branch: free at inference)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.active = p > 0
        self.drop = nn.Dropout(p=p) if p > 0 else None

    def construct(self, x: Tensor) -> Tensor:
        if self.active and self.training:
            return self.drop(x)
        return x


def causal_mask(s: int) -> Tensor:
    """[1, S, S] bool, True where a query may see a key, computed in the graph: a stored [n_positions]^2 constant
    would be copied into every compiled graph (64 MB each at 8192 positions, in memory and in the compile cache)."""
    pos = ops.arange(0, s, dtype=ms.int32)
    return pos.reshape(1, s, 1) >= pos.reshape(1, 1, s)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, n_head: int, multi_query: bool,
           dropout: nn.Cell | None = None) -> Tensor:
    """Scaled dot-product attention. q [B,S,H*d] (already scaled), k/v [B,T,kv*d], mask bool [B,S,T] -> [B,S,H*d].
    `dropout` applies to the attention probabilities (HF's attn_pdrop)."""
    b, s, hd = q.shape
    t = k.shape[1]
    d = hd // n_head
    if multi_query:
        scores = ops.bmm(q.reshape(b, s * n_head, d), k.swapaxes(1, 2)).reshape(b, s, n_head, t)
        scores = ops.select(mask.reshape(b, s, 1, t).broadcast_to((b, s, n_head, t)),
                            scores.astype(ms.float32), ops.full_like(scores, MASK_MIN, dtype=ms.float32))
        probs = ops.softmax(scores, axis=-1).astype(v.dtype)
        if dropout is not None:
            probs = dropout(probs)
        return ops.bmm(probs.reshape(b, s * n_head, t), v).reshape(b, s, hd)
    qh = q.reshape(b, s, n_head, d).swapaxes(1, 2).reshape(b * n_head, s, d)
    kh = k.reshape(b, t, n_head, d).swapaxes(1, 2).reshape(b * n_head, t, d)
    vh = v.reshape(b, t, n_head, d).swapaxes(1, 2).reshape(b * n_head, t, d)
    scores = ops.bmm(qh, kh.swapaxes(1, 2)).reshape(b, n_head, s, t)
    full_mask = mask.reshape(b, 1, s, t).broadcast_to((b, n_head, s, t))
    scores = ops.select(full_mask, scores.astype(ms.float32), ops.full_like(scores, MASK_MIN, dtype=ms.float32))
    probs = ops.softmax(scores, axis=-1).astype(vh.dtype).reshape(b * n_head, s, t)
    if dropout is not None:
        probs = dropout(probs)
    out = ops.bmm(probs, vh).reshape(b, n_head, s, d).swapaxes(1, 2)
    return out.reshape(b, s, hd)


def split_last(x: Tensor, sizes: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """x [..., a+b+c] -> its three consecutive pieces along the last axis (the CPU Slice kernel, far cheaper than
    `split`'s StridedSlice per piece). ops.slice, not ops.narrow: narrow's input check inside a
    cell with a bprop (SplitLast) broke the compile of another bprop cell using narrow (ChunkedBackwardDense) in
    the same graph."""
    a, b, c = sizes
    zeros, lead = (0,) * (x.ndim - 1), x.shape[:-1]
    return (ops.slice(x, zeros + (0,), lead + (a,)), ops.slice(x, zeros + (a,), lead + (b,)),
            ops.slice(x, zeros + (a + b,), lead + (c,)))


class SplitLast(nn.Cell):
    """`split_last` whose backward is one concat of the three gradients: autodiff's is a zero-filled SliceGrad per
    piece and an AddN of the three, a measurable share of a small model's training step."""

    def __init__(self, a: int, b: int, c: int) -> None:
        super().__init__()
        self.sizes = (a, b, c)

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_last(x, self.sizes)

    def bprop(self, x: Tensor, out: tuple, dout: tuple) -> tuple[Tensor]:
        return (ops.concat((dout[0], dout[1], dout[2]), axis=-1),)


class GPTBigCodeAttention(nn.Cell):
    def __init__(self, config: GPTBigCodeConfig, dtype: ms.Type) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.multi_query = config.multi_query
        self.embed_dim = config.n_embd
        self.kv_dim = config.kv_heads * config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.c_attn = Linear(config.n_embd, config.n_embd + 2 * self.kv_dim, config.initializer_range, dtype)
        self.c_proj = Linear(config.n_embd, config.n_embd, config.initializer_range, dtype)
        self.attn_dropout = Dropout(config.attn_pdrop)
        self.resid_dropout = Dropout(config.resid_pdrop)
        d = config.head_dim
        self.split = SplitLast(self.embed_dim, self.kv_dim, self.kv_dim) if self.multi_query else SplitLast(d, d, d)

    def split_qkv(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scaled query [B,S,H*d], key [B,S,kv*d], value [B,S,kv*d]) of `c_attn(hidden)`."""
        return self.split_fused(self.c_attn(hidden))

    def split_fused(self, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`c_attn`'s output [B,S,E+2kv*d] -> (scaled q, k, v). HF's fused rows differ by variant: multi-query
        [q (H*d) | k (d) | v (d)], multi-head per head [q_h | k_h | v_h] (H x 3d). Training splits through the
        `SplitLast` cell (its backward), inference inline (the cell made a tiny prefill several times slower)."""
        b, s, _ = fused.shape
        pieces = fused if self.multi_query else fused.reshape(b, s, self.n_head, -1)
        q, k, v = self.split(pieces) if self.training else split_last(pieces, self.split.sizes)
        if not self.multi_query:
            q, k, v = q.reshape(b, s, self.embed_dim), k.reshape(b, s, self.embed_dim), v.reshape(b, s, self.embed_dim)
        return q * self.scale, k, v

    def construct(self, hidden: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.split_qkv(hidden)
        out = attend(q, k, v, mask, self.n_head, self.multi_query, self.attn_dropout)
        return self.resid_dropout(self.c_proj(out))


class GPTBigCodeMLP(nn.Cell):
    def __init__(self, config: GPTBigCodeConfig, dtype: ms.Type) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.inner_dim, config.initializer_range, dtype)
        self.act = Activation(config.activation_function)
        self.c_proj = Linear(config.inner_dim, config.n_embd, config.initializer_range, dtype)
        self.dropout = Dropout(config.resid_pdrop)

    def construct(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPTBigCodeBlock(nn.Cell):
    def __init__(self, config: GPTBigCodeConfig, dtype: ms.Type) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = GPTBigCodeAttention(config, dtype)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = GPTBigCodeMLP(config, dtype)

    def construct(self, hidden: Tensor, mask: Tensor) -> Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), mask)
        return hidden + self.mlp(self.ln_2(hidden))


class Embedding(nn.Cell):
    def __init__(self, rows: int, dim: int, init_range: float, dtype: ms.Type) -> None:
        super().__init__()
        self.weight = Parameter(initializer(Normal(init_range), (rows, dim), dtype), name="weight")

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)


class GPTBigCodeModel(nn.Cell):
    def __init__(self, config: GPTBigCodeConfig, dtype: ms.Type = ms.float32) -> None:
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.n_embd, config.initializer_range, dtype)
        self.wpe = Embedding(config.n_positions, config.n_embd, config.initializer_range, dtype)
        self.h = nn.CellList([GPTBigCodeBlock(config, dtype) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.drop = Dropout(config.embd_pdrop)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return self.drop(self.wte(input_ids) + self.wpe(position_ids))

    def construct(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.embed(input_ids, position_ids)
        for block in self.h:
            hidden = block(hidden, mask)
        return self.ln_f(hidden)


class GPTBigCodeForCausalLM(nn.Cell):
    """The LM: the transformer plus an LM head tied to `transformer.wte.weight` (no parameter of its own)."""

    def __init__(self, config: GPTBigCodeConfig, precision: str = "fp32") -> None:
        super().__init__()
        self.config = config
        self.precision = precision
        self.transformer = GPTBigCodeModel(config, _DTYPES[precision])
        self.head_matmul = ops.MatMul(transpose_b=True)  # tied head: no per-call transpose of the embedding
        self.head_matmul_t = ops.MatMul()

    def lm_head(self, hidden: Tensor, weight_t: Parameter | None = None, linear: Callable | None = None) -> Tensor:
        """hidden [..., E] -> fp32 logits [..., V] from the tied embedding [V, E], or from `weight_t`, a transposed
        copy [E, V] (see `transposed_head`), or through `linear` (x, W [V, E]) -> x W^T (kernels.NativeKernels.linear,
        reading the embedding as stored): the same products, on the kernel or layout that may read them faster."""
        shape = hidden.shape
        wte = self.transformer.wte.weight
        flat = hidden.reshape(-1, shape[-1]).astype(wte.dtype)
        if linear is not None:
            logits = linear(flat, wte)
        elif weight_t is None:
            logits = self.head_matmul(flat, wte)
        else:
            logits = self.head_matmul_t(flat, weight_t)
        return logits.astype(ms.float32).reshape(shape[:-1] + (logits.shape[-1],))

    def transposed_head(self) -> Parameter:
        """A copy of the tied embedding as [E, V], for `lm_head(weight_t=...)`: a snapshot of the current weights,
        not updated by training (inference caches hold it; `Generator.sync_weights` refreshes theirs)."""
        wte = self.transformer.wte.weight
        return Parameter(Tensor(np.ascontiguousarray(wte.asnumpy().T), dtype=wte.dtype), name="lm_head.weight_t",
                         requires_grad=False)

    def construct(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids/position_ids int32 [B,S], attention_mask (1 = real token) [B,S] -> fp32 logits [B,S,V]."""
        s = input_ids.shape[1]
        keep = attention_mask.astype(ms.bool_)
        mask = ops.logical_and(causal_mask(s), keep.reshape(keep.shape[0], 1, s))
        return self.lm_head(self.transformer(input_ids, position_ids, mask))
