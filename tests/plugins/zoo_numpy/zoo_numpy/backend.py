"""The npz exporter, its runner (a numpy GPTBigCode with a KV cache, implementing the host's Engine) and the
.npz converter."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from registry_spec.atomic import atomic_dir, atomic_path
from registry_spec.specs import ConvertResult, ExportResult


def _weights(model, weights, config):
    return {k: np.asarray(v, dtype=np.float32) for k, v in
            model.component("model").state_dict(model, weights, config).items()}


class NpzExporter:
    def export(self, model, spec):
        arch = model.component("config").reference(model.config(spec.config))
        state = _weights(model, spec.weights, spec.config)
        with atomic_dir(spec.output_dir) as tmp:
            np.savez(tmp / "weights.npz", **state)
            seq = spec.seq_length or arch["seq_length"]
            (tmp / "manifest.json").write_text(json.dumps({"backend": "npz", "architecture": arch,
                                                           "seq_length": seq, "model": spec.model}))
        return ExportResult(output_dir=spec.output_dir, backend="npz", mode="incremental",
                            manifest=spec.output_dir / "manifest.json", files=["manifest.json", "weights.npz"])

    def runner(self, model, folder):
        return NumpyEngine(Path(folder))


class NpzConverter:
    suffix = ".npz"

    def accepts(self, path):
        return Path(path).exists()

    def convert(self, model, spec):
        t0 = time.perf_counter()
        config = spec.config
        if config is None and Path(spec.input).is_dir() and (Path(spec.input) / "config.json").is_file():
            config = Path(spec.input) / "config.json"
        state = _weights(model, spec.input, config)
        with atomic_path(spec.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **state)
        return ConvertResult(output=spec.output, direction="-> npz", tensors=len(state),
                             parameters=sum(v.size for v in state.values()), dtype="F32",
                             seconds=round(time.perf_counter() - t0, 3))


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x, kind):
    if kind == "gelu":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))).astype(np.float32)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class NumpyEngine:
    """Right-padded rows, per-row positions; the cache is (K, V) per layer, [B, max_len, kv_heads, head_dim]."""

    fixed_batch = None
    fixed_length = None

    def __init__(self, folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        self.a = manifest["architecture"]
        self.context_length = manifest["seq_length"]
        self.max_batch = 8
        with np.load(folder / "weights.npz") as z:
            self.w = {k: z[k] for k in z.files}
        self.heads = self.a["n_head"]
        self.hd = self.a["n_embd"] // self.heads
        self.kv = 1 if self.a["multi_query"] else self.heads

    def _layer(self, i, x, pos, cache):
        """x [B, T, E] at positions pos [B, T]; writes K/V there and attends causally over the cache."""
        w, a, p = self.w, self.a, f"transformer.h.{i}."
        eps = a["layer_norm_epsilon"]
        h = _ln(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        e, kvd = a["n_embd"], self.kv * self.hd
        b, t = x.shape[:2]
        q = qkv[..., :e].reshape(b, t, self.heads, self.hd)
        k = qkv[..., e:e + kvd].reshape(b, t, self.kv, self.hd)
        v = qkv[..., e + kvd:].reshape(b, t, self.kv, self.hd)
        ck, cv = cache[i]
        rows = np.arange(b)[:, None]
        ck[rows, pos], cv[rows, pos] = k, v
        keys = np.repeat(ck, self.heads // self.kv, axis=2)  # [B, S, H, D]
        vals = np.repeat(cv, self.heads // self.kv, axis=2)
        scores = np.einsum("bthd,bshd->bhts", q, keys) / math.sqrt(self.hd)
        allowed = np.arange(ck.shape[1])[None, None, :] <= pos[:, :, None]  # [B, T, S]
        scores = np.where(allowed[:, None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("bhts,bshd->bthd", probs, vals).reshape(b, t, e)
        x = x + attn @ w[p + "attn.c_proj.weight"].T + w[p + "attn.c_proj.bias"]
        h = _ln(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        h = _gelu(h @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"], a["activation_function"])
        return x + h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]

    def _forward(self, ids, pos, cache):
        w = self.w
        x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][pos]
        for i in range(self.a["n_layer"]):
            x = self._layer(i, x, pos, cache)
        return _ln(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], self.a["layer_norm_epsilon"])

    def prefill(self, ids, lengths, max_len, greedy, use_cache):
        b, t = ids.shape
        shape = (b, max(max_len, t), self.kv, self.hd)
        cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.a["n_layer"])]
        pos = np.broadcast_to(np.arange(t), (b, t))
        h = self._forward(ids, pos, cache)
        last = h[np.arange(b), lengths - 1]
        return last @ self.w["transformer.wte.weight"].T, cache

    def step(self, cache, tokens, positions, greedy=None):
        pos = positions.astype(np.int64)[:, None]
        h = self._forward(tokens.astype(np.int64)[:, None], pos, cache)
        return h[:, 0] @ self.w["transformer.wte.weight"].T
