"""The int8 screening copy of the LM head that `GreedyHead` (native/head.cc) reads to find the greedy token without
reading all of the fp32 head: per-row scaled int8 weights and the per-row coefficients of the bound that makes
the screen exact (the kernel re-scores the rows the bound cannot rule out on the fp32 weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from . import NativeKernels


def greedy_tables(weight: np.ndarray, native: NativeKernels) -> tuple[np.ndarray, np.ndarray] | None:
    """weight [V,E] fp32 -> (Q [V,E] int8, info [V,3] fp32: s_v, c1_v, c2_v), or None where the weights are not
    all finite (the bound would not hold). Computed by `GreedyTables` (native/head.cc) on the kernels' threads.

    With W[v] ~ s_v Q[v] (s_v = max|W[v]| / 127) and the kernel's int16 hidden x ~ s_x X, |x.W[v] - s_v s_x X.Q[v]|
    <= |x| |W[v] - s_v Q[v]| + |x - s_x X| |s_v Q[v]|, and the fp32 dot product that re-scores a row is within
    gamma_E |x| |W[v]| of x.W[v] (gamma_E = E u / (1 - E u), u = 2^-24). So c1_v = |W[v] - s_v Q[v]| +
    gamma_E |W[v]| and c2_v = |s_v Q[v]|, computed in float64, inflated by 1e-6 and rounded up to fp32."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, dim = weight.shape
    quantized = np.empty((rows, dim), dtype=np.int8)
    info = np.empty((rows, 3), dtype=np.float32)
    if native.host.GreedyTables(weight.ctypes.data, rows, dim, quantized.ctypes.data, info.ctypes.data):
        return None
    return quantized, info
