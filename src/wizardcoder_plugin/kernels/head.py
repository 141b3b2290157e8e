"""The int8 screening copy of the LM head that `GreedyHead` (native/head.cc) reads to find the greedy token without
reading all of the fp32 head: per-row scaled int8 weights and the per-row coefficients of the bound that makes
the screen exact (the kernel re-scores the rows the bound cannot rule out on the fp32 weights)."""

from __future__ import annotations

import numpy as np

_UNIT = 2.0**-24  # fp32 unit roundoff
_CHUNK = 256  # rows per float64 block: bounds the memory this takes and keeps each pass over a block in cache


def greedy_tables(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """weight [V,E] fp32 -> (Q [V,E] int8, info [V,3] fp32: s_v, c1_v, c2_v), or None where the weights are not
    all finite (the bound would not hold).

    With W[v] ~ s_v Q[v] and the kernel's int16 hidden x ~ s_x X, |x.W[v] - s_v s_x X.Q[v]| <=
    |x| |W[v] - s_v Q[v]| + |x - s_x X| |s_v Q[v]|, and the fp32 dot product that re-scores a row is within
    gamma_E |x| |W[v]| of x.W[v] (gamma_E = E u / (1 - E u), u = 2^-24). So c1_v = |W[v] - s_v Q[v]| +
    gamma_E |W[v]| and c2_v = |s_v Q[v]|, computed in float64, inflated by 1e-6 and rounded up to fp32."""
    rows, dim = weight.shape
    gamma = dim * _UNIT / (1 - dim * _UNIT)
    quantized = np.empty((rows, dim), dtype=np.int8)
    info = np.empty((rows, 3), dtype=np.float32)
    for lo in range(0, rows, _CHUNK):
        w = weight[lo: lo + _CHUNK].astype(np.float64)
        if not np.isfinite(w).all():
            return None
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        divisor = np.where(scale > 0, scale, 1).astype(np.float64)[:, None]
        q = np.clip(np.rint(w / divisor), -127, 127)
        w_hat = q * scale.astype(np.float64)[:, None]  # exact: an fp32 scale times a small integer
        c1 = np.linalg.norm(w - w_hat, axis=1) + gamma * np.linalg.norm(w, axis=1)
        c2 = np.linalg.norm(w_hat, axis=1)
        quantized[lo: lo + _CHUNK] = q.astype(np.int8)
        info[lo: lo + _CHUNK, 0] = scale
        info[lo: lo + _CHUNK, 1] = _round_up(c1 * (1 + 1e-6))
        info[lo: lo + _CHUNK, 2] = _round_up(c2 * (1 + 1e-6))
    return quantized, info


def _round_up(x: np.ndarray) -> np.ndarray:
    """float64 -> the nearest fp32 at or above it."""
    f = x.astype(np.float32)
    return np.where(f < x, np.nextafter(f, np.float32(np.inf)), f)
