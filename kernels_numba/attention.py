"""Absorbed MLA attention over the latent cache: scores, causal softmax, latent values.

Query row (t, h) is q[t, h] = [q_lat (C) ; q_pe (R)] at position first_pos + t; cache row u is
kv[u] = [c (C) ; k_pe (R)] (W = C + R). For keys u <= first_pos + t:
    s[t, h, u] = scale * q[t, h] . kv[u];   p = softmax_u(s);   out[t, h] = sum_u p[t, h, u] kv[u, :C]

Three parallel passes, each reading the cache once: scores over blocks of keys (every head per
key row, so a key row is read once for all H heads), softmax per query row, and values over
blocks of latent columns. Plain numba loops instead of BLAS so decode does not mix numba's and
OpenBLAS's thread pools (on a busy machine their spinning workers slow each other down).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FASTMATH = {"reassoc", "contract"}  # vectorized float32 dot products; inf stays inf
KEY_BLOCK = 16
COL_BLOCK = 32


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _scores(s, q, kv, scale, first_pos):
    # s (T, H, L) out; q (T, H, W); kv (L, W). Future keys are left unset (softmax skips them).
    T, H, W = q.shape
    L = kv.shape[0]
    for b in prange((L + KEY_BLOCK - 1) // KEY_BLOCK):
        for u in range(b * KEY_BLOCK, min(L, (b + 1) * KEY_BLOCK)):
            for t in range(max(0, u - first_pos), T):
                for h in range(H):
                    acc = np.float32(0.0)
                    for d in range(W):
                        acc += q[t, h, d] * kv[u, d]
                    s[t, h, u] = acc * scale


@njit(parallel=True, cache=True)
def _softmax(s, first_pos):
    # In place over keys 0..first_pos+t of each row (t, h); later keys get probability 0.
    T, H, L = s.shape
    for r in prange(T * H):
        t, h = r // H, r % H
        n = min(L, first_pos + t + 1)
        m = s[t, h, 0]
        for u in range(1, n):
            m = max(m, s[t, h, u])
        tot = np.float32(0.0)
        for u in range(n):
            e = np.exp(s[t, h, u] - m)
            s[t, h, u] = e
            tot += e
        inv = np.float32(1.0) / tot
        for u in range(n):
            s[t, h, u] *= inv
        for u in range(n, L):
            s[t, h, u] = 0.0


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _values(out, p, kv):
    # out (T, H, C) = p (T, H, L) @ kv[:, :C], in blocks of latent columns.
    T, H, C = out.shape
    L = kv.shape[0]
    for b in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        c0, c1 = b * COL_BLOCK, min(C, (b + 1) * COL_BLOCK)
        for t in range(T):
            for h in range(H):
                for c in range(c0, c1):
                    out[t, h, c] = 0.0
            for u in range(L):
                for h in range(H):
                    w = p[t, h, u]
                    if w != 0.0:
                        for c in range(c0, c1):
                            out[t, h, c] += w * kv[u, c]


def mla_attend(q: np.ndarray, kv: np.ndarray, n_latent: int, scale: float, first_pos: int, out=None) -> np.ndarray:
    """q float32 (T, H, W), kv float32 (L, W) with L >= first_pos + T -> out float32 (T, H, C)."""
    T, H, W = q.shape
    L = kv.shape[0]
    if kv.ndim != 2 or kv.shape[1] != W or not 0 < n_latent <= W:
        raise ValueError(f"mla_attend: q {q.shape} and cache {kv.shape} disagree (latent {n_latent})")
    if first_pos + T > L or first_pos < 0:
        raise ValueError(f"mla_attend: queries at {first_pos}..{first_pos + T - 1} but only {L} cache rows")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if kv.dtype != np.float32 or kv.strides[1] != 4:
        raise ValueError("mla_attend: cache must be float32 with contiguous rows")
    if out is None:
        out = np.empty((T, H, n_latent), dtype=np.float32)
    s = np.empty((T, H, L), dtype=np.float32)
    _scores(s, q, kv, np.float32(scale), first_pos)
    _softmax(s, first_pos)
    _values(out, s, kv[:, :n_latent])
    return out
