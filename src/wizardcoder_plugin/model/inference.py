"""KV-cache inference on the network of `modeling`: the per-bucket caches, the prefill and decode graphs that share
them, the cache-free last-token graph, and the LM head alone (for timing its layouts). MindSpore's kernels only:
the native CPU kernels substitute these cells' hook methods in `kernels.cells`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .config import GPTBigCodeConfig
from .modeling import MASK_MIN, GPTBigCodeBlock, GPTBigCodeForCausalLM, attend, causal_mask, linear

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
    """What prefill and decode share: the model, its caches, the per-head layout of a key/value write, and the
    block (`block`: LayerNorm, linear layers and MLP through the `norm` and `dense` hooks; each cell's own
    `attention`)."""

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

    def norm(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return self.model.transformer.ln_f.normalize(x, w, b)  # every LayerNorm has the config's epsilon

    def dense(self, x: Tensor, w: Tensor, b: Tensor, residual: Tensor | None = None, act: bool = False) -> Tensor:
        """act(x W^T + b), or x W^T + b (+ residual)."""
        y = linear(x, w, b)
        if act:
            return self.model.transformer.h[0].mlp.act(y)
        return y if residual is None else y + residual

    def block(self, hidden: Tensor, rows: Tensor, context: Tensor, weights: tuple[Tensor, ...], keys: Tensor,
              values: Tensor) -> Tensor:
        """One block on `weights` (`block_weights`' order), its keys and values written at `rows` of `keys` and
        `values` (the layer's flat caches); `context` is what the cell's `attention` masks with. A method of its
        weights, so MindSpore's front end compiles it once for every layer instead of once per layer object
        (benchmarks/RESULTS.md has the compile times)."""
        ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, fc_w, fc_b, proj_w, proj_b = weights
        attn = self.model.transformer.h[0].attn  # its split and scale, the same in every block
        q, k, v = attn.split_fused(self.dense(self.norm(hidden, ln1_w, ln1_b), qkv_w, qkv_b))
        out = self.attention(q, k, v, rows, context, keys, values)
        hidden = self.dense(out, o_w, o_b, residual=hidden)
        inner = self.dense(self.norm(hidden, ln2_w, ln2_b), fc_w, fc_b, act=True)
        return self.dense(inner, proj_w, proj_b, residual=hidden)

    def write(self, keys: Tensor, values: Tensor, rows: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B,S,kv*d] at `rows` of a layer's flat caches [B*kv*T, d]; the updated caches."""
        return (self.update(keys, rows, self.by_head(k).astype(keys.dtype)),
                self.update(values, rows, self.by_head(v).astype(values.dtype)))


def block_weights(block: GPTBigCodeBlock) -> tuple[Parameter, ...]:
    """A block's parameters in `_CachedCell.block`'s order (the checkpoint's names, in the order they are used)."""
    attn, mlp = block.attn, block.mlp
    return (block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight,
            attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight,
            mlp.c_proj.bias)


class PrefillCell(_CachedCell):
    """Runs right-padded prompts [B,S], writes every position's key and value into the caches' rows `slots` [B]
    (default: the first B; a cache may hold more rows, the others are left as they are), returns the logits at
    each row's last real token [B,V] (`out`). `norm`, `dense` (the shared `block`'s) and `out` are the hooks a
    substitute (kernels.cells.NativePrefillCell) replaces."""

    def out(self, hidden: Tensor) -> Tensor:
        """[B,E] at each row's last token -> what the graph returns: logits [B,V]."""
        return self.head(hidden)

    def start(self, input_ids: Tensor, slots: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The embedded prompts [B,S,E], the cache rows [B*kv,S] their keys and values go to, the causal mask."""
        b, s = input_ids.shape
        positions = ops.arange(0, s, dtype=ms.int32).reshape(1, s).broadcast_to((b, s))
        mask = causal_mask(s).broadcast_to((b, s, s))
        return self.model.transformer.embed(input_ids, positions), self.cache_rows(positions, slots), mask

    def attention(self, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, mask: Tensor, keys: Tensor,
                  values: Tensor) -> Tensor:
        """The prompt's keys and values written at `rows`; its attention over them under the causal `mask`."""
        written = self.write(keys, values, rows, k, v)
        return ops.depend(attend(q, k, v, mask, self.n_head, self.model.config.multi_query), written)

    def finish(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        """What the graph returns (`out`) for each row's last real token."""
        last = ops.stack((ops.arange(0, hidden.shape[0], dtype=ms.int32), lengths - 1), axis=-1)
        return self.out(ops.gather_nd(hidden, last))

    def construct(self, input_ids: Tensor, lengths: Tensor, slots: Tensor | None = None) -> Tensor:
        hidden, rows, mask = self.start(input_ids, slots)
        for i, block in enumerate(self.model.transformer.h):
            hidden = self.block(hidden, rows, mask, block_weights(block), self.keys[i], self.values[i])
        return self.finish(hidden, lengths)


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
            hidden = self.block(hidden, rows, bias, block_weights(block), self.keys[i], self.values[i])
        return hidden.reshape(b, -1)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, bias: Tensor, keys: Tensor,
                  values: Tensor) -> Tensor:
        """The step's key and value written at `rows`; its attention over the updated caches."""
        keys, values = self.write(keys, values, rows, k, v)
        return self.attend(q, keys, values, bias)

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
