"""Absorbed MLA attention of one new token, all heads in one parallel region (runtime/mla.py has the maths).

Per head h, with the cache rows kv[u] = [c(u) (C) ; k_pe(u) (R)], u < L:
    q_lat   = k_b[h] q_nope[h]                          (C)  k_b (H, C, N)
    s(u)    = scale * ([q_lat ; q_pe[h]] . kv[u])
    o_lat   = sum_u softmax(s)(u) c(u)                  (C)
    o[h]    = v_b[h] o_lat                              (V)  v_b (H, V, C)

Tasks are groups of heads. A task reads each cache row once for all its heads (scores, then values),
so the cache is streamed twice per task instead of twice per head. Quantized k_b / v_b (Q8_0, Q4_0)
take 8-bit activations (q_nope quantized by the caller, o_lat per head inside the task); float32 ones
take float32 activations.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

from r1cpu.kernels_numba import actquant
from r1cpu.kernels_numba.intrinsics import KIND_F32, KIND_Q4_0, KIND_Q8_0, dot_row
from r1cpu.quant.registry import GGMLType

_FASTMATH = {"reassoc", "contract"}  # vectorized float32 dot products; inf stays inf
QK = actquant.QK


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _attend_group(o_lat, s, q, kv, h0, h1, scale):
    # q (H, C+R) = [q_lat ; q_pe]; s (H, L) scratch; o_lat (H, C) out, for heads h0..h1-1.
    L, W = kv.shape
    C = o_lat.shape[1]
    for u in range(L):
        for h in range(h0, h1):
            acc = np.float32(0.0)
            for i in range(W):
                acc += q[h, i] * kv[u, i]
            s[h, u] = acc * scale
    for h in range(h0, h1):
        m = s[h, 0]
        for u in range(1, L):
            m = max(m, s[h, u])
        tot = np.float32(0.0)
        for u in range(L):
            e = np.exp(s[h, u] - m)
            s[h, u] = e
            tot += e
        inv = np.float32(1.0) / tot
        for u in range(L):
            s[h, u] *= inv
        o_lat[h, :] = 0.0
    for u in range(L):
        for h in range(h0, h1):
            p = s[h, u]
            for c in range(C):
                o_lat[h, c] += p * kv[u, c]


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _absorb_q(q, h, kind, k_b, q_nope, qn):
    # q[h, :C] = k_b[h] q_nope[h]; qn = (q, d, s): q_nope as 8-bit blocks, for quantized k_b
    C, N = k_b.shape[1], q_nope.shape[1]
    for c in range(C):
        if kind == KIND_F32:
            acc = np.float32(0.0)
            for n in range(N):
                acc += k_b[h, c, n] * q_nope[h, n]
            q[h, c] = acc
        else:
            off = h * k_b.strides[0] + c * k_b.strides[1]
            q[h, c] = dot_row(kind, k_b, off, qn[0], h * N, qn[1], qn[2], h * (N // QK), N // QK)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _absorb_out(o, h, kind, v_b, o_lat, ol):
    # o[h] = v_b[h] o_lat[h]; ol = (q, d, s) scratch for o_lat as 8-bit blocks, for quantized v_b
    V, C = o.shape[1], o_lat.shape[1]
    if kind != KIND_F32:
        for b in range(C // QK):
            actquant.quantize_block(ol[0][h], ol[1][h], ol[2][h], o_lat[h], b * QK, b)
    for v in range(V):
        if kind == KIND_F32:
            acc = np.float32(0.0)
            for c in range(C):
                acc += v_b[h, v, c] * o_lat[h, c]
            o[h, v] = acc
        else:
            off = h * v_b.strides[0] + v * v_b.strides[1]
            o[h, v] = dot_row(kind, v_b, off, ol[0], h * C, ol[1], ol[2], h * (C // QK), C // QK)


@njit(cache=True, parallel=True, fastmath=_FASTMATH)  # the inlined loops take the caller's flags
def _decode(o, ws, kinds, k_b, v_b, q_nope, qn, q_pe, kv, scale, group):
    # o (H, V) out; ws = (q (H, C+R), s (H, L), o_lat (H, C), (oq, od, os)); kinds (k_b, v_b)
    q, s, o_lat, ol = ws
    H, C = q.shape[0], o_lat.shape[1]
    for g in prange((H + group - 1) // group):
        h0, h1 = g * group, min(H, (g + 1) * group)
        for h in range(h0, h1):
            _absorb_q(q, h, kinds[0], k_b, q_nope, qn)
            q[h, C:] = q_pe[h]
        _attend_group(o_lat, s, q, kv, h0, h1, scale)
        for h in range(h0, h1):
            _absorb_out(o, h, kinds[1], v_b, o_lat, ol)


def absorb_weight(qtype, data: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(kind, data) of attn_k_b / attn_v_b stored as qtype, or None for types this kernel does not
    read (they keep the per-head linear path)."""
    kind = {GGMLType.Q8_0: KIND_Q8_0, GGMLType.Q4_0: KIND_Q4_0, GGMLType.F32: KIND_F32}.get(qtype)
    return None if kind is None else (kind, data)


class MLADecode:
    """Scratch of one attention shape (H heads, C latent, R rope, N nope, V value), grown with L."""

    def __init__(self, H: int, C: int, R: int, N: int, V: int):
        nb = max(1, C // QK)  # quantized weights have whole blocks: C (v_b rows), N (k_b rows)
        self.q = np.zeros((H, C + R), np.float32)
        self.s = np.zeros(0, np.float32)  # (H, L) scores, flat so every view is C-contiguous
        self.o_lat = np.zeros((H, C), np.float32)
        self.ol = (np.zeros((H, C), np.int8), np.zeros((H, nb), np.float32), np.zeros((H, nb * actquant.LANES), np.int32))
        self.o = np.zeros((H, V), np.float32)
        self.act = actquant.ActQ8()

    def __call__(self, kinds, k_b, v_b, q_nope, q_pe, kv, scale: float, threads: int) -> np.ndarray:
        """o (H, V) for one query. kinds int64 (2,) and k_b, v_b arrays from absorb_weight; q_nope (H, N),
        q_pe (H, R) rotated, float32 C-contiguous; kv (L, C+R) float32 cache rows; one task per thread,
        so each streams the cache once. Returns a buffer the next call overwrites."""
        H, L = self.q.shape[0], kv.shape[0]
        if self.s.size < H * L:
            self.s = np.zeros(H * max(L, 256, 2 * (self.s.size // H)), np.float32)
        if kinds[0] == KIND_F32:
            qn = self.ol  # unused: float32 k_b takes q_nope as it is
        else:
            self.act.quantize(q_nope)
            qn = (self.act.q, self.act.d, self.act.s)
        ws = (self.q, self.s[: H * L].reshape(H, L), self.o_lat, self.ol)
        group = -(-H // max(1, threads))
        _decode(self.o, ws, kinds, k_b, v_b, q_nope, qn, q_pe, kv, np.float32(scale), group)
        return self.o


_local = threading.local()  # per Python thread: one MLADecode per attention shape


def plan(k_b_qtype, k_b: np.ndarray, v_b_qtype, v_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(kinds, k_b, v_b) for decode(), or None when either weight's type is not read here."""
    k, v = absorb_weight(k_b_qtype, k_b), absorb_weight(v_b_qtype, v_b)
    if k is None or v is None:
        return None
    return np.array([k[0], v[0]], np.int64), k[1], v[1]


def decode(absorb, q_nope: np.ndarray, q_pe: np.ndarray, kv: np.ndarray, scale: float) -> np.ndarray:
    """o float32 (H, V) of one query: absorb from plan(); q_nope (H, N), q_pe (H, R) rotated; kv (L, C+R).
    The result is a buffer the next call on this thread overwrites."""
    kinds, k_b, v_b = absorb
    H, C, N = k_b.shape[0], kv.shape[1] - q_pe.shape[1], q_nope.shape[1]
    key = (H, C, q_pe.shape[1], N, v_b.shape[1])
    spaces = _local.__dict__.setdefault("spaces", {})
    if key not in spaces:
        spaces[key] = MLADecode(*key)
    q_nope, q_pe = np.ascontiguousarray(q_nope, np.float32), np.ascontiguousarray(q_pe, np.float32)
    return spaces[key](kinds, k_b, v_b, q_nope, q_pe, kv, scale, numba.get_num_threads())
