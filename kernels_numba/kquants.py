"""Products with k-quant weights (Q2_K..Q6_K) and their 32-block fallbacks (Q5_0, Q5_1).

The same two kernels per type as kernels_numba/matmul.py, so matmul's matvec / matmat / row lookup
run them through its `Codec` table (see `CODECS` at the end):
  _matvec_<t>(out, w, x)    out[r] = w[r] . x, prange over rows, float32 accumulators
  _rows_<t>(out, w, rows)   out[i] = w[rows[i]] dequantized, bit-identical to quant/<t>.py
The byte offsets inside a block are those drawn in the docstrings of quant/<t>.py. Q4_K, Q6_K and Q5_0,
the bulk of a q4_k_m file, multiply 8-bit activations in integers instead (kquant_int.py); the others
keep the float dot products below.

In the dot products the affine parts are paid once per sub-block: sum (d sc q - dmin m) x =
d sc (sum q x) - dmin m (sum x), and a signed level q - z gives sum q x - z sum x; the sub-block sums
of x are computed once per call, for all rows. Each inner loop runs over contiguous bytes with
constant shifts, and levels are cast to uint8 before float so LLVM converts bytes (int64 lanes
vectorize badly on AVX2): 2.6x faster for Q6_K than 16-element loops with variable shifts.
All kernels are lazy @njit: GGUF weights are read-only memmap views.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from r1cpu.kernels_numba.intrinsics import KIND_Q2_K, KIND_Q3_K, KIND_Q4_K, KIND_Q5_0, KIND_Q5_1, KIND_Q5_K, KIND_Q6_K
from r1cpu.kernels_numba.kquant_int import matvec_q4_k, matvec_q5_0, matvec_q6_k
from r1cpu.kernels_numba.kquant_rows import (
    deq_q2_k,
    deq_q3_k,
    deq_q4_k,
    deq_q5_0,
    deq_q5_1,
    deq_q5_k,
    deq_q6_k,
    f16_at,
    q3_scale,
    scale_min_k4,
    u32_at,
)
from r1cpu.kernels_numba.matmul import Codec
from r1cpu.quant import q2_k, q3_k, q4_k, q5_0, q5_1, q5_k, q6_k
from r1cpu.quant.registry import GGMLType

_FASTMATH = {"reassoc", "contract"}  # dot products only; the dequantizers stay exact
F32 = np.float32


# ---- dot product of one row with x; xs[j] = sum of x over sub-block j (16 or 32 elements) ----


@njit(cache=True)
def _block_sums(x, n):
    """float32[x.size / n]: the sums of x over consecutive runs of n (shared by every row)."""
    xs = np.empty(x.size // n, F32)
    for j in range(xs.size):
        s = F32(0)
        for i in range(n):
            s += x[n * j + i]
        xs[j] = s
    return xs


@njit(cache=True, fastmath=_FASTMATH)
def _dot_q2_k(a, x, xs):
    acc = F32(0)
    for b in range(x.size // 256):
        o, xo = b * 84, b * 256
        d, dmin = f16_at(a, o + 80), f16_at(a, o + 82)
        for h in range(2):  # 32 bytes hold elements 128h + 32k + l at bits 2k
            for half in range(2):
                q0, x0 = o + 16 + 32 * h + 16 * half, xo + 128 * h + 16 * half
                p0 = p1 = p2 = p3 = F32(0)
                for i in range(16):
                    v = a[q0 + i]
                    p0 += F32(np.uint8(v & 3)) * x[x0 + i]
                    p1 += F32(np.uint8((v >> 2) & 3)) * x[x0 + 32 + i]
                    p2 += F32(np.uint8((v >> 4) & 3)) * x[x0 + 64 + i]
                    p3 += F32(np.uint8(v >> 6)) * x[x0 + 96 + i]
                j = 8 * h + half  # sub-block of k = 0; k adds 2
                s0, s1, s2, s3 = a[o + j], a[o + j + 2], a[o + j + 4], a[o + j + 6]
                acc += d * (F32(s0 & 15) * p0 + F32(s1 & 15) * p1 + F32(s2 & 15) * p2 + F32(s3 & 15) * p3)
                j += 16 * b
                acc -= dmin * (F32(s0 >> 4) * xs[j] + F32(s1 >> 4) * xs[j + 2] + F32(s2 >> 4) * xs[j + 4]
                               + F32(s3 >> 4) * xs[j + 6])  # fmt: skip
    return acc


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _q3_k_run(a, q0, m0, x, x0, hshift):
    """sum q x for the 4 sub-blocks that 16 qs bytes cover; hshift (0 or 4, a constant once
    inlined) selects the hmask bits of this half of the block."""
    p0 = p1 = p2 = p3 = F32(0)
    for i in range(16):
        v, m = a[q0 + i], a[m0 + i] >> hshift
        p0 += F32(np.uint8((v & 3) | ((m & 1) << 2))) * x[x0 + i]
        p1 += F32(np.uint8(((v >> 2) & 3) | ((m & 2) << 1))) * x[x0 + 32 + i]
        p2 += F32(np.uint8(((v >> 4) & 3) | (m & 4))) * x[x0 + 64 + i]
        p3 += F32(np.uint8((v >> 6) | ((m & 8) >> 1))) * x[x0 + 96 + i]
    return p0, p1, p2, p3


@njit(cache=True, fastmath=_FASTMATH)
def _dot_q3_k(a, x, xs):
    acc = F32(0)
    for b in range(x.size // 256):
        o, xo = b * 110, b * 256
        d = f16_at(a, o + 108)
        for h in range(2):  # as Q2_K, plus bit 4h + k of hmask[l] for element 128h + 32k + l
            for half in range(2):
                q0, m0, x0 = o + 32 + 32 * h + 16 * half, o + 16 * half, xo + 128 * h + 16 * half
                if h == 0:
                    p0, p1, p2, p3 = _q3_k_run(a, q0, m0, x, x0, 0)
                else:
                    p0, p1, p2, p3 = _q3_k_run(a, q0, m0, x, x0, 4)
                j = 8 * h + half
                t = 16 * b + j
                acc += d * (F32(q3_scale(a, o + 96, j)) * (p0 - F32(4) * xs[t])
                            + F32(q3_scale(a, o + 96, j + 2)) * (p1 - F32(4) * xs[t + 2])
                            + F32(q3_scale(a, o + 96, j + 4)) * (p2 - F32(4) * xs[t + 4])
                            + F32(q3_scale(a, o + 96, j + 6)) * (p3 - F32(4) * xs[t + 6]))  # fmt: skip
    return acc


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _q5_k_chunk(a, q0, h0, x, x0, lo_bit, hi_bit):
    """sum q x over the two sub-blocks of one 32-byte chunk; inlined per chunk, so the qh bit
    positions are constants and the loop vectorizes (1.4x faster than shifting by 2c)."""
    p0 = p1 = F32(0)
    for i in range(32):
        v, hb = a[q0 + i], a[h0 + i]
        p0 += F32(np.uint8((v & 15) | (((hb >> lo_bit) & 1) << 4))) * x[x0 + i]
        p1 += F32(np.uint8((v >> 4) | (((hb >> hi_bit) & 1) << 4))) * x[x0 + 32 + i]
    return p0, p1


@njit(cache=True, fastmath=_FASTMATH)
def _dot_q5_k(a, x, xs):
    acc = F32(0)
    for b in range(x.size // 256):
        o, xo = b * 176, b * 256
        d, dmin = f16_at(a, o), f16_at(a, o + 2)
        for c in range(4):
            if c == 0:
                p0, p1 = _q5_k_chunk(a, o + 48, o + 16, x, xo, 0, 1)
            elif c == 1:
                p0, p1 = _q5_k_chunk(a, o + 80, o + 16, x, xo + 64, 2, 3)
            elif c == 2:
                p0, p1 = _q5_k_chunk(a, o + 112, o + 16, x, xo + 128, 4, 5)
            else:
                p0, p1 = _q5_k_chunk(a, o + 144, o + 16, x, xo + 192, 6, 7)
            sc0, m0 = scale_min_k4(a, o + 4, 2 * c)
            sc1, m1 = scale_min_k4(a, o + 4, 2 * c + 1)
            j = 8 * b + 2 * c
            acc += d * (F32(sc0) * p0 + F32(sc1) * p1) - dmin * (F32(m0) * xs[j] + F32(m1) * xs[j + 1])
    return acc


@njit(cache=True, fastmath=_FASTMATH)
def _dot_q5_1(a, x, xs):
    acc = F32(0)
    for b in range(x.size // 32):
        o, xo = b * 24, b * 32
        qh = u32_at(a, o + 4)
        p = F32(0)
        for i in range(16):
            v = a[o + 8 + i]
            p += F32(np.uint8((v & 15) | (((qh >> i) & 1) << 4))) * x[xo + i]
            p += F32(np.uint8((v >> 4) | (((qh >> (i + 16)) & 1) << 4))) * x[xo + 16 + i]
        acc += f16_at(a, o) * p + f16_at(a, o + 2) * xs[b]
    return acc


# ---- prange drivers --------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _matvec_q2_k(out, w, x):
    xs = _block_sums(x, 16)
    for r in prange(w.shape[0]):
        out[r] = _dot_q2_k(w[r], x, xs)


@njit(cache=True, parallel=True)
def _matvec_q3_k(out, w, x):
    xs = _block_sums(x, 16)
    for r in prange(w.shape[0]):
        out[r] = _dot_q3_k(w[r], x, xs)


@njit(cache=True, parallel=True)
def _matvec_q5_k(out, w, x):
    xs = _block_sums(x, 32)
    for r in prange(w.shape[0]):
        out[r] = _dot_q5_k(w[r], x, xs)


@njit(cache=True, parallel=True)
def _matvec_q5_1(out, w, x):
    xs = _block_sums(x, 32)
    for r in prange(w.shape[0]):
        out[r] = _dot_q5_1(w[r], x, xs)


@njit(cache=True, parallel=True)
def _rows_q2_k(out, w, rows):
    for i in prange(rows.size):
        deq_q2_k(w[rows[i]], out[i])


@njit(cache=True, parallel=True)
def _rows_q3_k(out, w, rows):
    for i in prange(rows.size):
        deq_q3_k(w[rows[i]], out[i])


@njit(cache=True, parallel=True)
def _rows_q4_k(out, w, rows):
    for i in prange(rows.size):
        deq_q4_k(w[rows[i]], out[i])


@njit(cache=True, parallel=True)
def _rows_q5_k(out, w, rows):
    for i in prange(rows.size):
        deq_q5_k(w[rows[i]], out[i])


@njit(cache=True, parallel=True)
def _rows_q6_k(out, w, rows):
    for i in prange(rows.size):
        deq_q6_k(w[rows[i]], out[i])


@njit(cache=True, parallel=True)
def _rows_q5_0(out, w, rows):
    for i in prange(rows.size):
        deq_q5_0(w[rows[i]], out[i])


@njit(cache=True, parallel=True)
def _rows_q5_1(out, w, rows):
    for i in prange(rows.size):
        deq_q5_1(w[rows[i]], out[i])


# The kernels above hard-code these block sizes and byte offsets.
assert (q2_k.TYPE_SIZE, q3_k.TYPE_SIZE, q4_k.TYPE_SIZE, q5_k.TYPE_SIZE, q6_k.TYPE_SIZE) == (84, 110, 144, 176, 210)
assert (q5_0.TYPE_SIZE, q5_1.TYPE_SIZE) == (22, 24)

_KERNELS = {
    GGMLType.Q2_K: (_matvec_q2_k, _rows_q2_k, KIND_Q2_K),
    GGMLType.Q3_K: (_matvec_q3_k, _rows_q3_k, KIND_Q3_K),
    GGMLType.Q4_K: (matvec_q4_k, _rows_q4_k, KIND_Q4_K),
    GGMLType.Q5_K: (_matvec_q5_k, _rows_q5_k, KIND_Q5_K),
    GGMLType.Q6_K: (matvec_q6_k, _rows_q6_k, KIND_Q6_K),
    GGMLType.Q5_0: (matvec_q5_0, _rows_q5_0, KIND_Q5_0),
    GGMLType.Q5_1: (_matvec_q5_1, _rows_q5_1, KIND_Q5_1),
}
# matmul's codec for each type (data viewed as bytes); dispatch merges these into matmul.CODECS. The kind
# lets prefill decode tiles of rows on every thread (matmul._decode_row) for its per-thread sgemm.
CODECS: dict[GGMLType, Codec] = {t: Codec(np.uint8, np.uint8, mv, rows, kind) for t, (mv, rows, kind) in _KERNELS.items()}
