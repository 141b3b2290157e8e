"""The exportable inference graphs: fixed shapes, KV caches as explicit inputs/outputs, and only ops that MindIR,
ONNX (via `mindspore.onnx.export`) and the MindSpore Lite 2.0 converter all accept.

They reuse the online network's weights and sub-cells (LayerNorms, projections, MLP) but restate the steps that
do not export: masks are additive biases instead of select, the cache update is a one-hot blend instead of an
in-place scatter, the last real token is picked with a one-hot matmul instead of gather_nd, and GELU is written
out as its tanh formula (Lite's GeLU kernel is the erf form).

- `PrefillGraph(input_ids [B,T], lengths [B]) -> (logits [B,V], cache [L,B,T,W])` (T = the export seq length)
- `DecodeGraph(token [B,1], positions [B], cache [L,B,T,W]) -> (logits [B,V], cache [L,B,T,W])`
- `FullGraph(input_ids [B,T], lengths [B]) -> logits [B,V]` (the autoregressive mode: no cache)
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..model.modeling import GPTBigCodeForCausalLM, causal_mask

_NEG = -1e9  # additive mask bias: exp underflows to exactly 0 after the max subtraction
_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + ops.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


class _Layers(nn.Cell):
    """Shared per-layer math on explicit tensors."""

    def __init__(self, model: GPTBigCodeForCausalLM) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        cfg = model.config
        if cfg.activation_function not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"activation {cfg.activation_function!r} does not export (exact erf GELU has no "
                             "ONNX-exportable MindSpore op)")
        self.n_head, self.multi_query = cfg.n_head, cfg.multi_query
        self.kv_dim = cfg.kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim

    def qkv(self, block: nn.Cell, x: Tensor) -> tuple[Tensor, Tensor]:
        """(scaled query [B,S,H*d], key|value [B,S,2*kv*d]) for the block's input x: the exported cache keeps HF's
        fused layout (multi-query [k | v]; multi-head per head [k_h | v_h])."""
        q, k, v = block.attn.split_qkv(block.ln_1(x))
        if self.multi_query:
            return q, ops.concat((k, v), axis=-1)
        b, s, _ = k.shape
        h, d = self.n_head, self.head_dim
        return q, ops.concat((k.reshape(b, s, h, d), v.reshape(b, s, h, d)), axis=-1).reshape(b, s, 2 * h * d)

    def mlp(self, block: nn.Cell, x: Tensor) -> Tensor:
        h = block.mlp.c_fc(block.ln_2(x))
        return block.mlp.c_proj(gelu_tanh(h))

    def attention(self, block: nn.Cell, q: Tensor, kv: Tensor, bias: Tensor) -> Tensor:
        """q [B,S,H*d] (scaled), kv [B,T,W], bias [B,S,T] additive -> [B,S,E]."""
        b, s, hd = q.shape
        t = kv.shape[1]
        d = self.head_dim
        h = self.n_head
        if self.multi_query:
            k, v = kv[:, :, : self.kv_dim], kv[:, :, self.kv_dim:]
            scores = ops.bmm(q.reshape(b, s * h, d), k.swapaxes(1, 2)).reshape(b, s, h, t)
            scores = scores.astype(ms.float32) + bias.reshape(b, s, 1, t)
            probs = ops.softmax(scores, axis=-1).astype(v.dtype)
            out = ops.bmm(probs.reshape(b, s * h, t), v).reshape(b, s, hd)
        else:
            heads = kv.reshape(b, t, h, 2 * d)
            k = heads[:, :, :, :d].swapaxes(1, 2).reshape(b * h, t, d)
            v = heads[:, :, :, d:].swapaxes(1, 2).reshape(b * h, t, d)
            qh = q.reshape(b, s, h, d).swapaxes(1, 2).reshape(b * h, s, d)
            scores = ops.bmm(qh, k.swapaxes(1, 2)).reshape(b, h, s, t)
            scores = scores.astype(ms.float32) + bias.reshape(b, 1, s, t)
            probs = ops.softmax(scores, axis=-1).astype(v.dtype).reshape(b * h, s, t)
            out = ops.bmm(probs, v).reshape(b, h, s, d).swapaxes(1, 2).reshape(b, s, hd)
        return block.attn.c_proj(out)

    def last_token_logits(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        """hidden [B,S,E] -> logits [B,V] at each row's last real token (one-hot matmul: no gather_nd)."""
        b, s, _ = hidden.shape
        pick = (ops.arange(0, s, dtype=ms.int32).reshape(1, 1, s) == (lengths - 1).reshape(b, 1, 1))
        last = ops.bmm(pick.astype(hidden.dtype), hidden)  # [B,1,E]
        tr = self.model.transformer
        return self.model.lm_head(tr.ln_f(last)).reshape(b, -1)

    def causal_bias(self, lengths: Tensor, s: int) -> Tensor:
        b = lengths.shape[0]
        keep = ops.arange(0, s, dtype=ms.int32).reshape(1, 1, s) < lengths.reshape(b, 1, 1)
        return (1.0 - ops.logical_and(causal_mask(s), keep).astype(ms.float32)) * _NEG


class PrefillGraph(_Layers):
    def construct(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        b, s = input_ids.shape
        tr = self.model.transformer
        positions = ops.arange(0, s, dtype=ms.int32).reshape(1, s).broadcast_to((b, s))
        bias = self.causal_bias(lengths, s)
        hidden = tr.wte(input_ids) + tr.wpe(positions)
        caches = []
        for block in tr.h:
            q, kv = self.qkv(block, hidden)
            caches.append(kv.reshape(1, b, s, -1))
            hidden = hidden + self.attention(block, q, kv, bias)
            hidden = hidden + self.mlp(block, hidden)
        return self.last_token_logits(hidden, lengths), ops.concat(caches, axis=0).astype(ms.float32)


class DecodeGraph(_Layers):
    def construct(self, token: Tensor, positions: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        b = token.shape[0]
        t = cache.shape[2]
        tr = self.model.transformer
        slots = ops.arange(0, t, dtype=ms.int32).reshape(1, t)
        here = (slots == positions.reshape(b, 1)).astype(ms.float32).reshape(b, t, 1)  # the slot to write
        bias = ((1.0 - (slots <= positions.reshape(b, 1)).astype(ms.float32)) * _NEG).reshape(b, 1, t)
        hidden = tr.wte(token) + tr.wpe(positions.reshape(b, 1))
        caches = []
        for i, block in enumerate(tr.h):
            q, kv = self.qkv(block, hidden)
            layer = cache[i] * (1.0 - here) + kv.astype(ms.float32) * here  # [B,T,W]
            caches.append(layer.reshape(1, b, t, -1))
            hidden = hidden + self.attention(block, q, layer.astype(kv.dtype), bias)
            hidden = hidden + self.mlp(block, hidden)
        logits = self.model.lm_head(tr.ln_f(hidden)).reshape(b, -1)
        return logits, ops.concat(caches, axis=0)


class FullGraph(_Layers):
    def construct(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        b, s = input_ids.shape
        tr = self.model.transformer
        positions = ops.arange(0, s, dtype=ms.int32).reshape(1, s).broadcast_to((b, s))
        bias = self.causal_bias(lengths, s)
        hidden = tr.wte(input_ids) + tr.wpe(positions)
        for block in tr.h:
            q, kv = self.qkv(block, hidden)
            hidden = hidden + self.attention(block, q, kv, bias)
            hidden = hidden + self.mlp(block, hidden)
        return self.last_token_logits(hidden, lengths)


def example_inputs(config: object, graph: str, batch: int, seq: int) -> tuple[Tensor, ...]:
    """Inputs fixing the exported shapes."""
    ids = Tensor(np.zeros((batch, seq), np.int32))
    lengths = Tensor(np.ones((batch,), np.int32))
    if graph == "decode":
        width = 2 * config.kv_heads * config.head_dim  # type: ignore[attr-defined]
        cache = Tensor(np.zeros((config.n_layer, batch, seq, width), np.float32))  # type: ignore[attr-defined]
        return Tensor(np.zeros((batch, 1), np.int32)), lengths, cache
    return ids, lengths
