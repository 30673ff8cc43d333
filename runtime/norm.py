"""RMSNorm in float32: w * x / sqrt(mean(x^2) + eps) (HF, fp32 throughout)."""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True)
def _rmsnorm(out, x, w, eps):
    # out, x: (T, D) float32; w: (D,) float32. Serial: a row is a few microseconds, and a
    # parallel region costs more than that to start, on every layer of every decoded token.
    n, d = x.shape
    for t in range(n):
        acc = np.float32(0.0)
        for i in range(d):
            acc += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(acc / np.float32(d) + eps)
        for i in range(d):
            out[t, i] = w[i] * (x[t, i] * inv)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x float32 (D,) or (T, D); w float32 (D,). Returns a new float32 array of x's shape."""
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if w.shape != (x2.shape[1],):
        raise ValueError(f"rmsnorm: weight shape {w.shape} does not match input width {x2.shape[1]}")
    out = np.empty_like(x2)
    _rmsnorm(out, x2, np.ascontiguousarray(w, dtype=np.float32), np.float32(eps))
    return out.reshape(x.shape)
