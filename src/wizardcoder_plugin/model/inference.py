"""KV-cache inference on the network of `modeling`: the per-bucket caches, the prefill and decode graphs that share
them, the cache-free last-token graph, and the LM head alone (for timing its layouts). MindSpore's kernels only:
the native CPU kernels substitute these cells' hook methods in `kernels.cells`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .config import GPTBigCodeConfig
from .modeling import MASK_MIN, Activation, GPTBigCodeForCausalLM, LayerNorm, Linear, attend, causal_mask

if TYPE_CHECKING:
    from collections.abc import Callable


class KVCache(nn.Cell):
    """Per-layer key and value caches for one (batch, max_len) bucket, each stored as rows
    [(B*kv_heads)*T, d] (kv_heads = 1 for multi-query) and viewed as [B*kv_heads, T, d]. Keys and values live
    apart so decoding never slices or transposes a cache; flat rows let ScatterUpdate write a step's rows in
    place (ScatterNdUpdate on CPU copies the whole cache on every write)."""

    def __init__(self, config: GPTBigCodeConfig, batch: int, max_len: int, dtype: ms.Type, tag: str) -> None:
        super().__init__(auto_prefix=False)
        self.max_len = max_len
        shape = (batch * config.kv_heads * max_len, config.head_dim)

        def caches(kind: str) -> ms.ParameterTuple:
            return ms.ParameterTuple(
                Parameter(Tensor(np.zeros(shape, dtype=np.float32), dtype=dtype), name=f"{kind}_cache.{tag}.{i}",
                          requires_grad=False)
                for i in range(config.n_layer))

        self.keys, self.values = caches("key"), caches("value")


class _CachedCell(nn.Cell):
    """What prefill and decode share: the model, its caches, and the per-head layout of a key/value write."""

    native = None  # the native kernels' build where kernels.cells substituted the hooks
    head_linear: Callable | None = None  # the LM head's matmul where a substitute brings its own

    def __init__(self, model: GPTBigCodeForCausalLM, cache: KVCache, head_t: Parameter | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        self.head_t = head_t  # the LM head's transposed copy, where that layout is the faster one
        self.keys, self.values = cache.keys, cache.values
        self.max_len = cache.max_len
        self.update = ops.ScatterUpdate()
        cfg = model.config
        self.n_head, self.kv_heads, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim

    def head(self, hidden: Tensor) -> Tensor:
        """Final LayerNorm and LM head for one position per row: [B,E] -> fp32 logits [B,V]."""
        return self.model.lm_head(self.model.transformer.ln_f(hidden), self.head_t, self.head_linear)

    def by_head(self, x: Tensor) -> Tensor:
        """[B,S,kv*d] -> [B*kv,S,d] (a reshape for multi-query)."""
        b, s, _ = x.shape
        if self.kv_heads == 1:
            return x.reshape(b, s, self.head_dim)
        return x.reshape(b, s, self.kv_heads, self.head_dim).swapaxes(1, 2).reshape(b * self.kv_heads, s,
                                                                                   self.head_dim)

    def cache_rows(self, positions: Tensor, slots: Tensor | None = None) -> Tensor:
        """positions [B,S] of the cache's rows `slots` [B] (default: the first B) -> the cache rows [B*kv,S] they
        are written to."""
        b, s = positions.shape
        if slots is None:
            first = ops.arange(0, b * self.kv_heads, dtype=ms.int32).reshape(b * self.kv_heads, 1) * self.max_len
        else:
            heads = slots.reshape(b, 1) * self.kv_heads + ops.arange(0, self.kv_heads, dtype=ms.int32).reshape(1, -1)
            first = heads.reshape(b * self.kv_heads, 1) * self.max_len
        if self.kv_heads > 1:
            positions = positions.reshape(b, 1, s).broadcast_to((b, self.kv_heads, s))
        return first + positions.reshape(b * self.kv_heads, s)

    def write(self, i: int, rows: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B,S,kv*d] at `rows`; the updated flat caches [B*kv*T, d]."""
        keys = self.update(self.keys[i], rows, self.by_head(k).astype(self.keys[i].dtype))
        values = self.update(self.values[i], rows, self.by_head(v).astype(self.values[i].dtype))
        return keys, values


class PrefillCell(_CachedCell):
    """Runs right-padded prompts [B,S], writes every position's key and value into the caches' rows `slots` [B]
    (default: the first B; a cache may hold more rows, the others are left as they are), returns the logits at
    each row's last real token [B,V] (`out`). A block is `norm`, `dense` and attention: the hooks a substitute
    (kernels.cells.NativePrefillCell) replaces."""

    def norm(self, x: Tensor, ln: LayerNorm) -> Tensor:
        return ln(x)

    def dense(self, x: Tensor, linear: Linear, residual: Tensor | None = None, act: Activation | None = None) -> Tensor:
        """act(linear(x)), or linear(x) (+ residual)."""
        y = linear(x)
        if act is not None:
            return act(y)
        return y if residual is None else y + residual

    def out(self, hidden: Tensor) -> Tensor:
        """[B,E] at each row's last token -> what the graph returns: logits [B,V]."""
        return self.head(hidden)

    def construct(self, input_ids: Tensor, lengths: Tensor, slots: Tensor | None = None) -> Tensor:
        b, s = input_ids.shape
        tr = self.model.transformer
        positions = ops.arange(0, s, dtype=ms.int32).reshape(1, s).broadcast_to((b, s))
        rows = self.cache_rows(positions, slots)
        mask = causal_mask(s).broadcast_to((b, s, s))
        hidden = tr.embed(input_ids, positions)
        for i, block in enumerate(tr.h):
            attn, mlp = block.attn, block.mlp
            q, k, v = attn.split_fused(self.dense(self.norm(hidden, block.ln_1), attn.c_attn))
            written = self.write(i, rows, k, v)
            out = ops.depend(attend(q, k, v, mask, attn.n_head, attn.multi_query), written)
            hidden = self.dense(out, attn.c_proj, residual=hidden)
            inner = self.dense(self.norm(hidden, block.ln_2), mlp.c_fc, act=mlp.act)
            hidden = self.dense(inner, mlp.c_proj, residual=hidden)
        last = ops.stack((ops.arange(0, b, dtype=ms.int32), lengths - 1), axis=-1)
        return self.out(ops.gather_nd(hidden, last))


class DecodeCell(_CachedCell):
    """One step for every row: token [B,1] at position [B] -> logits [B,V] (or, with `greedy`, the argmax token
    ids [B] int64, so a greedy step returns 8 bytes per row); caches updated in place.

    Built for few kernels per layer, since MindSpore on CPU pays per kernel: the key is written once and read
    transposed by the score matmul (no cache slice or transpose), the mask is one additive bias computed once per
    step, and every query head sharing a key/value head is one batched matmul. `blocks` and `pick` are the hooks a
    substitute (kernels.cells.NativeDecodeCell) replaces. Its phase is "increment": MindSpore then reuses the
    compiled graph without re-walking the cell tree on every call (fixed input shapes per cell make that safe)."""

    def __init__(self, model: GPTBigCodeForCausalLM, cache: KVCache, greedy: bool = False,
                 head_t: Parameter | None = None) -> None:
        super().__init__(model, cache, head_t)
        self.greedy = greedy
        self.key_positions = Tensor(np.arange(cache.max_len, dtype=np.int32))
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.scores_2d = ops.MatMul(transpose_b=True)
        self.argmax = ops.ArgMaxWithValue(axis=-1)  # first index of the max, like torch; faster than Argmax on CPU
        self.phase = "increment"

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
        """q [B,1,H*d] (scaled) against the flat caches [B*kv*T, d], bias [B,1,T] -> [B,1,H*d]. A single cache row
        (batch 1, multi-query) runs as 2-D matmuls on the flat caches: no view kernels."""
        b = q.shape[0]
        rows, groups = b * self.kv_heads, self.n_head // self.kv_heads
        if rows == 1:
            scores = self.scores_2d(q.reshape(groups, self.head_dim).astype(keys.dtype), keys)
        else:
            keys = keys.reshape(rows, self.max_len, self.head_dim)
            values = values.reshape(rows, self.max_len, self.head_dim)
            scores = self.scores(q.reshape(rows, groups, self.head_dim).astype(keys.dtype), keys)
        scores = scores.reshape(b, self.n_head, -1).astype(ms.float32) + bias
        probs = ops.softmax(scores, axis=-1).astype(values.dtype)
        if rows == 1:
            out = ops.matmul(probs.reshape(groups, -1), values)
        else:
            out = ops.bmm(probs.reshape(rows, groups, -1), values)
        return out.reshape(b, 1, self.n_head * self.head_dim)

    def blocks(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """hidden [B,1,E] through every block, each writing its key and value at `positions` [B] -> [B,E]."""
        b = hidden.shape[0]
        rows = self.cache_rows(positions.reshape(b, 1))
        bias = (self.key_positions.reshape(1, 1, -1) > positions.reshape(b, 1, 1)).astype(ms.float32) * MASK_MIN
        for i, block in enumerate(self.model.transformer.h):
            attn = block.attn
            q, k, v = attn.split_qkv(block.ln_1(hidden))
            keys, values = self.write(i, rows, k, v)
            out = self.attend(q, keys, values, bias)
            hidden = hidden + attn.c_proj(out)
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return hidden.reshape(b, -1)

    def pick(self, hidden: Tensor) -> Tensor:
        """[B,E] -> logits [B,V], or greedy ids [B]."""
        logits = self.head(hidden)
        if self.greedy:
            return self.argmax(logits)[0]
        return logits

    def construct(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        b = input_ids.shape[0]
        return self.pick(self.blocks(self.model.transformer.embed(input_ids, positions.reshape(b, 1)), positions))


class LastTokenCell(nn.Cell):
    """The cache-free path: the whole right-padded sequence [B,T] -> logits at each row's last real token [B,V]."""

    def __init__(self, model: GPTBigCodeForCausalLM) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        b, s = input_ids.shape
        tr = self.model.transformer
        positions = ops.arange(0, s, dtype=ms.int32).reshape(1, s).broadcast_to((b, s))
        keep = positions < lengths.reshape(b, 1)
        mask = ops.logical_and(causal_mask(s), keep.reshape(b, 1, s))
        hidden = tr(input_ids, positions, mask)
        last = ops.stack((ops.arange(0, b, dtype=ms.int32), lengths - 1), axis=-1)
        return self.model.lm_head(ops.gather_nd(hidden, last))


class LMHeadCell(nn.Cell):
    """The LM head alone, hidden [B,E] -> argmax ids [B]: what `Generator` times to pick the head's layout
    (`head_t`: the transposed copy) or kernel (`linear`: kernels.NativeKernels.linear)."""

    def __init__(self, model: GPTBigCodeForCausalLM, head_t: Parameter | None, linear: Callable | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.model, self.head_t, self.linear = model, head_t, linear
        self.argmax = ops.ArgMaxWithValue(axis=-1)
        self.phase = "increment"

    def construct(self, hidden: Tensor) -> Tensor:
        return self.argmax(self.model.lm_head(hidden, self.head_t, self.linear))[0]
