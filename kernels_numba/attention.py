"""Absorbed MLA attention of a batch of queries over the latent cache (prefill; decode has mla_decode.py).

Query row (t, h) is q[t, h] = [q_lat (C) ; q_pe (R)] at position first_pos + t; cache row u is
kv[u] = [c (C) ; k_pe (R)] (W = C + R). For keys u <= first_pos + t:
    s[t, h, u] = scale * q[t, h] . kv[u];   p = softmax_u(s);   out[t, h] = sum_u p[t, h, u] kv[u, :C]

Per head these are two matrix products, (T, W) x (W, L) and (T, L) x (L, C): each numba thread takes
whole heads and runs them with single-threaded cblas_sgemm (kernels_numba/threads.py), the causal
softmax in between in numba. Without cblas, numpy's batched matmul does the same in this thread.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

from r1cpu.kernels_numba import threads

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
Q_CHUNK = 128  # query rows per product: smaller chunks skip more masked keys but run sgemm less well


@njit(cache=True, inline="always")
def _causal_softmax_rows(s, first_pos):
    # in place over keys 0..first_pos+t of each row t; later keys get probability 0
    T, L = s.shape
    for t in range(T):
        n = min(L, first_pos + t + 1)
        m = s[t, 0]
        for u in range(1, n):
            m = max(m, s[t, u])
        tot = np.float32(0.0)
        for u in range(n):
            e = np.exp(s[t, u] - m)
            s[t, u] = e
            tot += e
        inv = np.float32(1.0) / tot
        for u in range(n):
            s[t, u] *= inv
        for u in range(n, L):
            s[t, u] = 0.0


@njit(cache=True, parallel=True)
def _attend_heads(sgemm, out, q, kv, scale, first_pos, scratch):
    # out (T, H, C); q (T, H, W); kv (L, W) rows C-contiguous; scratch (threads, T*W + T*L) float32.
    # Queries go in chunks of Q_CHUNK, each against the keys it can see (first_pos + t1 of them):
    # a causal prompt then skips about half of both products and of the exponentials.
    T, H, W = q.shape
    L, C = kv.shape[0], out.shape[2]
    ld = kv.strides[0] // 4
    for h in prange(H):
        buf = scratch[get_thread_id()]
        qh = buf[: T * W].reshape((T, W))
        for t in range(T):
            qh[t] = q[t, h]
        for t0 in range(0, T, Q_CHUNK):
            t1 = min(T, t0 + Q_CHUNK)
            n, m = t1 - t0, min(L, first_pos + t1)
            s = buf[T * W : T * W + n * m].reshape((n, m))
            sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, n, m, W, np.float32(scale), qh[t0:].ctypes, W, kv.ctypes, ld,
                  np.float32(0.0), s.ctypes, m)  # fmt: skip
            _causal_softmax_rows(s, first_pos + t0)
            sgemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, n, C, m, np.float32(1.0), s.ctypes, m, kv.ctypes, ld,
                  np.float32(0.0), out[t0, h:].ctypes, H * C)  # fmt: skip


def _attend_numpy(out, q, kv, scale, first_pos):
    T, L, C = q.shape[0], kv.shape[0], out.shape[2]
    s = np.matmul(q.transpose(1, 0, 2), kv.T) * np.float32(scale)  # (H, T, L)
    if first_pos < L - 1:  # some key lies in a query's future
        s[:, np.arange(L)[None, :] > first_pos + np.arange(T)[:, None]] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    out[...] = np.matmul(s, kv[:, :C]).transpose(1, 0, 2)


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
    sgemm = threads.sgemm()
    if sgemm is None or not out.flags.c_contiguous:
        _attend_numpy(out, q, kv, scale, first_pos)
    else:
        scratch = np.empty((threads.get_threads(), T * W + T * L), np.float32)
        _attend_heads(sgemm, out, q, kv, scale, first_pos, scratch)
    return out
