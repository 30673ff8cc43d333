"""Row decoders of the k-quants (Q2_K..Q6_K) and their 32-block fallbacks (Q5_0, Q5_1): a = one row's
bytes, y = float32[n], bit-identical to quant/<t>.py. kquants.py runs them over rows (embedding lookups,
the portable prefill path) and matmul.py's prefill tiles decode with them; they import nothing of
either, so both can.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from r1cpu.kernels_numba.intrinsics import f16_to_f32

F32 = np.float32


@njit(cache=True)
def f16_at(a, o):
    return f16_to_f32(np.int64(a[o]) | (np.int64(a[o + 1]) << 8))


@njit(cache=True)
def scale_min_k4(a, o, j):
    """(sc, m) of sub-block j from the 12 packed bytes at a[o:] (Q4_K, Q5_K)."""
    if j < 4:
        return np.int64(a[o + j]) & 63, np.int64(a[o + j + 4]) & 63
    sc = (np.int64(a[o + j + 4]) & 15) | ((np.int64(a[o + j - 4]) >> 6) << 4)
    m = (np.int64(a[o + j + 4]) >> 4) | ((np.int64(a[o + j]) >> 6) << 4)
    return sc, m


@njit(cache=True)
def q3_scale(a, o, j):
    """Signed scale s_j - 32 of sub-block j from the 12 packed bytes at a[o:] (Q3_K)."""
    low = (np.int64(a[o + j % 8]) >> (4 * (j // 8))) & 15
    high = (np.int64(a[o + 8 + j % 4]) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


@njit(cache=True)
def u32_at(a, o):
    return np.int64(a[o]) | (np.int64(a[o + 1]) << 8) | (np.int64(a[o + 2]) << 16) | (np.int64(a[o + 3]) << 24)


# ---- dequantize one row: a = the row's bytes, y = float32[n] ---------------------------------


@njit(cache=True)
def deq_q2_k(a, y):
    for b in range(y.size // 256):
        o, yo = b * 84, b * 256
        d, dmin = f16_at(a, o + 80), f16_at(a, o + 82)
        for j in range(16):  # sub-block j: half j // 8, bit pair (j % 8) // 2, bytes 16 (j % 2) ..
            sc = np.int64(a[o + j])
            step, off = d * F32(sc & 15), dmin * F32(sc >> 4)
            q0, shift = o + 16 + 32 * (j // 8) + 16 * (j % 2), 2 * ((j % 8) // 2)
            for i in range(16):
                y[yo + 16 * j + i] = step * F32((a[q0 + i] >> shift) & 3) - off


@njit(cache=True)
def deq_q3_k(a, y):
    for b in range(y.size // 256):
        o, yo = b * 110, b * 256
        d = f16_at(a, o + 108)
        for j in range(16):
            step = d * F32(q3_scale(a, o + 96, j))
            q0, shift = o + 32 + 32 * (j // 8) + 16 * (j % 2), 2 * ((j % 8) // 2)
            for i in range(16):
                e = 16 * j + i
                q = ((a[q0 + i] >> shift) & 3) | (((a[o + e % 32] >> (e // 32)) & 1) << 2)
                y[yo + e] = step * F32(q - 4)


@njit(cache=True)
def deq_q4_k(a, y):
    for b in range(y.size // 256):
        o, yo = b * 144, b * 256
        d, dmin = f16_at(a, o), f16_at(a, o + 2)
        for j in range(8):
            sc, m = scale_min_k4(a, o + 4, j)
            step, off = d * F32(sc), dmin * F32(m)
            q0, shift = o + 16 + 32 * (j // 2), 4 * (j % 2)
            for i in range(32):
                y[yo + 32 * j + i] = step * F32((a[q0 + i] >> shift) & 15) - off


@njit(cache=True)
def deq_q5_k(a, y):
    for b in range(y.size // 256):
        o, yo = b * 176, b * 256
        d, dmin = f16_at(a, o), f16_at(a, o + 2)
        for j in range(8):
            sc, m = scale_min_k4(a, o + 4, j)
            step, off = d * F32(sc), dmin * F32(m)
            q0, shift = o + 48 + 32 * (j // 2), 4 * (j % 2)
            for i in range(32):
                q = ((a[q0 + i] >> shift) & 15) | (((a[o + 16 + i] >> j) & 1) << 4)
                y[yo + 32 * j + i] = step * F32(q) - off


@njit(cache=True)
def deq_q6_k(a, y):
    for b in range(y.size // 256):
        o, yo = b * 210, b * 256
        d = f16_at(a, o + 208)
        for j in range(16):  # half h = j // 8, group k = (j % 8) // 2, l from 16 (j % 2)
            step = d * F32(np.int8(a[o + 192 + j]))
            h, k = j // 8, (j % 8) // 2
            ql0, qh0 = o + 64 * h + 32 * (k % 2) + 16 * (j % 2), o + 128 + 32 * h + 16 * (j % 2)
            for i in range(16):
                q = ((a[ql0 + i] >> (4 * (k // 2))) & 15) | (((a[qh0 + i] >> (2 * k)) & 3) << 4)
                y[yo + 16 * j + i] = step * F32(q - 32)


@njit(cache=True)
def deq_q5_0(a, y):
    for b in range(y.size // 32):
        o, yo = b * 22, b * 32
        d, qh = f16_at(a, o), u32_at(a, o + 2)
        for i in range(16):
            lo = (a[o + 6 + i] & 15) | (((qh >> i) & 1) << 4)
            hi = (a[o + 6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)
            y[yo + i] = d * F32(lo - 16)
            y[yo + 16 + i] = d * F32(hi - 16)


@njit(cache=True)
def deq_q5_1(a, y):
    for b in range(y.size // 32):
        o, yo = b * 24, b * 32
        d, m, qh = f16_at(a, o), f16_at(a, o + 2), u32_at(a, o + 4)
        for i in range(16):
            lo = (a[o + 8 + i] & 15) | (((qh >> i) & 1) << 4)
            hi = (a[o + 8 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)
            y[yo + i] = d * F32(lo) + m
            y[yo + 16 + i] = d * F32(hi) + m
