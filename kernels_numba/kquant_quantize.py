"""Fast twins of the k-quant quantizers in quant/ (Q2_K..Q6_K) and of Q5_0 / Q5_1.

Bytes equal quant/<t>.py's, hence ggml's `quantize_row_*_ref`: the scale searches of
quant/kquant_search.py run here per sub-block in scalar float32, operation for operation (numba
would widen float32 op int64 to float64, so every constant and level is an explicit float32).
Levels are float32 integers until they are packed. `_rint` is round half to even, as ggml's
`nearest_int`. Row kernels take x float32[rows, n] and fill out uint8[rows, row_bytes], prange over
rows, with a little per-row scratch. This module adds them to kernels_numba/quantize.py's
FAST_QUANTIZERS when imported (quantize.py imports it last, as it needs quantize's f16 helpers).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from r1cpu.kernels_numba.matmul import f16_to_f32
from r1cpu.kernels_numba.quantize import FAST_QUANTIZERS, _f16_bits, _put_f16
from r1cpu.quant import q2_k, q3_k, q4_k, q5_0, q5_1, q5_k, q6_k
from r1cpu.quant.registry import GGMLType

F32 = np.float32
EPS = F32(1e-15)  # GROUP_MAX_EPS


@njit(cache=True)
def _rint(v):
    return np.rint(F32(v))


@njit(cache=True)
def _clamp(v, lo, hi):
    return min(max(v, lo), hi)


@njit(cache=True)
def _half(v):
    """v rounded to f16 and back: the value C reads back from the block after storing it."""
    return f16_to_f32(_f16_bits(F32(v).view(np.uint32)))


@njit(cache=True)
def _signed_absmax(x):
    amax, vmax = F32(0), F32(0)
    for i in range(x.size):
        if abs(x[i]) > amax:
            amax, vmax = abs(x[i]), x[i]
    return vmax


# ---- scale searches (quant/kquant_search.py) -------------------------------------------------


@njit(cache=True)
def _qkx2_error(x, w, L, scale, mn, use_mad):
    e = F32(0)
    for i in range(x.size):
        diff = scale * L[i] + mn - x[i]
        e += w[i] * (abs(diff) if use_mad else diff * diff)
    return e


@njit(cache=True)
def _qkx2(x, w, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants: levels into L, returns (scale, the_min)."""
    mn, mx, sum_w = x[0], x[0], w[0]
    sum_x = sum_w * x[0]
    for i in range(1, x.size):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = F32(0)
    if mx == mn:
        L[:] = 0
        return F32(0), -mn
    iscale = nmax / (mx - mn)
    scale = F32(1) / iscale
    for i in range(x.size):
        L[i] = _clamp(_rint(iscale * (x[i] - mn)), F32(0), nmax)
    best = _qkx2_error(x, w, L, scale, mn, use_mad)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + nmax) / (mx - mn)
        sum_l, sum_l2, sum_xl = F32(0), F32(0), F32(0)
        for i in range(x.size):
            Laux[i] = _clamp(_rint(iscale * (x[i] - mn)), F32(0), nmax)
            wl = w[i] * Laux[i]
            sum_l += wl
            sum_l2 += wl * Laux[i]
            sum_xl += wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min, this_scale = F32(0), sum_xl / sum_l2
            err = _qkx2_error(x, w, Laux, this_scale, this_min, use_mad)
            if err < best:
                L[:] = Laux
                best, scale, mn = err, this_scale, this_min
    return scale, -mn


@njit(cache=True)
def _qx_attempt(x, L, iscale, nmax):
    sumlx, suml2 = F32(0), F32(0)
    for i in range(x.size):
        L[i] = _clamp(_rint(iscale * x[i]), -nmax, nmax - F32(1))
        w = x[i] * x[i]
        sumlx += w * x[i] * L[i]
        suml2 += w * L[i] * L[i]
    return sumlx, suml2


@njit(cache=True)
def _qx(x, L, Laux, nmax):
    """make_qx_quants with rmse_type 1: levels (offset by nmax) into L, returns the scale."""
    mx = _signed_absmax(x)
    if abs(mx) < EPS:
        L[:] = 0
        return F32(0)
    sumlx, suml2 = _qx_attempt(x, L, -nmax / mx, nmax)
    scale = sumlx / suml2 if suml2 != 0 else F32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = _qx_attempt(x, Laux, -(nmax + F32(0.1) * F32(step)) / mx, nmax)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L[:] = Laux
            scale = sumlx / suml2
            best = scale * sumlx
    L += nmax
    return scale


@njit(cache=True)
def _q3(x, L, nmax):
    """make_q3_quants with do_rmse: levels (offset by nmax) into L, returns the scale."""
    mx = _signed_absmax(x)
    if abs(mx) < EPS:
        L[:] = 0
        return F32(0)
    sumlx, suml2 = _qx_attempt(x, L, -nmax / mx, nmax)
    for _ in range(5):
        changed = False
        for i in range(x.size):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * L[i]
            if slx > 0:
                sl2 = suml2 - w * L[i] * L[i]
                new = _clamp(_rint(x[i] * sl2 / slx), -nmax, nmax - F32(1))
                if new != L[i]:
                    slx += w * x[i] * new
                    sl2 += w * new * new
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2, changed = new, slx, sl2, True
        if not changed:
            break
    L += nmax
    return sumlx / suml2 if suml2 > 0 else F32(0)


# ---- Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit (scale, min) codes --------------------------


@njit(cache=True)
def _k4_code(v, vmax):
    """min(63, (uint8)nearest_int(63 / vmax * v)); vmax <= 0 gives code 0."""
    inv = F32(63) / vmax if vmax > 0 else F32(0)
    return min(63, np.int64(_rint(inv * v)) & 0xFF)


@njit(cache=True)
def _k4_block(x, y, L, s, nmax, rmin, nstep):
    """Search, encode d / dmin / 12 scale bytes into y[0:16], levels into L; s: f32[3, 32] scratch."""
    scales, mins = s[2, :8], s[2, 8:16]
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = F32(0)
        for i in range(32):
            sum_x2 += xs[i] * xs[i]
        av = F32(np.sqrt(sum_x2 / F32(32)))
        for i in range(32):
            s[0, i] = av + abs(xs[i])
        scales[j], mins[j] = _qkx2(xs, s[0], L[32 * j : 32 * j + 32], s[1], nmax, rmin, F32(0.1), nstep, False)
    max_scale, max_min = max(F32(0), scales.max()), max(F32(0), mins.max())
    for j in range(4):
        ls, lm = _k4_code(scales[j], max_scale), _k4_code(mins[j], max_min)
        hs, hm = _k4_code(scales[j + 4], max_scale), _k4_code(mins[j + 4], max_min)
        y[4 + j] = ls | ((hs >> 4) << 6)
        y[8 + j] = lm | ((hm >> 4) << 6)
        y[12 + j] = (hs & 15) | ((hm & 15) << 4)
    _put_f16(y, 0, max_scale / F32(63))
    _put_f16(y, 2, max_min / F32(63))
    d, dmin = _half(max_scale / F32(63)), _half(max_min / F32(63))
    for j in range(8):
        sc = y[4 + j] & 63 if j < 4 else (y[8 + j] & 15) | ((y[j] >> 6) << 4)
        m = y[8 + j] & 63 if j < 4 else (y[8 + j] >> 4) | ((y[4 + j] >> 6) << 4)
        step = d * F32(sc)
        if step == 0:
            continue  # keep the search's levels, as C does
        off = dmin * F32(m)
        for i in range(32):
            L[32 * j + i] = _clamp(_rint((x[32 * j + i] + off) / step), F32(0), nmax)


@njit(cache=True)
def _q4_k_block(x, y, L, s):
    _k4_block(x, y, L, s, F32(15), F32(-1), 20)
    for c in range(4):
        for i in range(32):
            y[16 + 32 * c + i] = np.uint8(L[64 * c + i]) | (np.uint8(L[64 * c + 32 + i]) << 4)


@njit(cache=True)
def _q5_k_block(x, y, L, s):
    _k4_block(x, y, L, s, F32(31), F32(-0.5), 15)
    for i in range(32):
        h = 0
        for j in range(8):
            h |= (np.int64(L[32 * j + i]) >> 4) << j
        y[16 + i] = h
    for c in range(4):
        for i in range(32):
            lo, hi = np.int64(L[64 * c + i]) & 15, np.int64(L[64 * c + 32 + i]) & 15
            y[48 + 32 * c + i] = lo | (hi << 4)


# ---- Q2_K, Q3_K, Q6_K: 16 sub-blocks of 16 ---------------------------------------------------


@njit(cache=True)
def _pack_2bit(L, qs):
    """The low 2 bits of 256 levels -> the 64 qs bytes of Q2_K / Q3_K."""
    for h in range(2):
        for i in range(32):
            v = 0
            for k in range(4):
                v |= (np.int64(L[128 * h + 32 * k + i]) & 3) << (2 * k)
            qs[32 * h + i] = v


@njit(cache=True)
def _q2_k_code(v, vmax):
    return np.int64(_rint(F32(15) / vmax * v)) if vmax > 0 else 0


@njit(cache=True)
def _q2_k_block(x, y, L, s):
    scales, mins = s[2, :16], s[2, 16:]
    for j in range(16):
        xs = x[16 * j : 16 * j + 16]
        for i in range(16):
            s[0, i] = abs(xs[i])
        Lj = L[16 * j : 16 * j + 16]
        scales[j], mins[j] = _qkx2(xs, s[0, :16], Lj, s[1, :16], F32(3), F32(-0.5), F32(0.1), 15, True)
    max_scale, max_min = max(F32(0), scales.max()), max(F32(0), mins.max())
    for j in range(16):
        y[j] = (_q2_k_code(scales[j], max_scale) | (_q2_k_code(mins[j], max_min) << 4)) & 0xFF
    _put_f16(y, 80, max_scale / F32(15))
    _put_f16(y, 82, max_min / F32(15))
    d, dmin = _half(max_scale / F32(15)), _half(max_min / F32(15))
    for j in range(16):
        step = d * F32(y[j] & 15)
        if step == 0:
            continue
        off = dmin * F32(y[j] >> 4)
        for i in range(16):
            L[16 * j + i] = _clamp(_rint((x[16 * j + i] + off) / step), F32(0), F32(3))
    _pack_2bit(L, y[16:80])


@njit(cache=True)
def _q3_k_block(x, y, L, s):
    scales, codes = s[2, :16], s[2, 16:]  # codes: 6-bit scale codes, as float32 integers
    for j in range(16):
        scales[j] = _q3(x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], F32(4))
    max_scale = _signed_absmax(scales)
    y[96:108] = 0
    codes[:] = 0
    _put_f16(y, 108, F32(0))
    if max_scale != 0:
        iscale = F32(-32) / max_scale
        for j in range(16):
            codes[j] = _clamp(_rint(iscale * scales[j]), F32(-32), F32(31)) + F32(32)
            c = np.int64(codes[j])
            y[96 + j % 8] |= (c & 15) << (4 * (j // 8))
            y[104 + j % 4] |= (c >> 4) << (2 * (j // 4))
        _put_f16(y, 108, F32(1) / iscale)
    d = f16_to_f32(np.int64(y[108]) | (np.int64(y[109]) << 8))
    for j in range(16):
        step = d * (codes[j] - F32(32))
        if step == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(_rint(x[16 * j + i] / step), F32(-4), F32(3)) + F32(4)
    for i in range(32):
        h = 0
        for b in range(8):
            h |= (np.int64(L[32 * b + i]) >> 2) << b
        y[i] = h
    _pack_2bit(L, y[32:96])


@njit(cache=True)
def _q6_k_block(x, y, L, s):
    scales = s[2, :16]
    for j in range(16):
        scales[j] = _qx(x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], s[1, :16], F32(32))
    max_scale = _signed_absmax(scales)
    if abs(max_scale) < EPS:
        y[:] = 0
        return
    iscale = F32(-128) / max_scale
    _put_f16(y, 208, F32(1) / iscale)
    d = _half(F32(1) / iscale)
    for j in range(16):
        sc = ((min(127, np.int64(_rint(iscale * scales[j]))) + 128) & 0xFF) - 128  # int8 store
        y[192 + j] = sc & 0xFF
        step = d * F32(sc)
        if step == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(_rint(x[16 * j + i] / step), F32(-32), F32(31)) + F32(32)
    for h in range(2):
        for i in range(32):
            q0, q1 = np.int64(L[128 * h + i]), np.int64(L[128 * h + 32 + i])
            q2, q3 = np.int64(L[128 * h + 64 + i]), np.int64(L[128 * h + 96 + i])
            y[64 * h + i] = (q0 & 15) | ((q2 & 15) << 4)
            y[64 * h + 32 + i] = (q1 & 15) | ((q3 & 15) << 4)
            y[128 + 32 * h + i] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)


# ---- Q5_0 / Q5_1 -----------------------------------------------------------------------------


@njit(cache=True)
def _put_5bit(q, y, o):
    """32 levels in [0, 31] -> qh u32 at y[o:o + 4] and qs at y[o + 4:o + 20]."""
    qh = 0
    for i in range(32):
        qh |= (q[i] >> 4) << i
    for b in range(4):
        y[o + b] = (qh >> (8 * b)) & 0xFF
    for i in range(16):
        y[o + 4 + i] = (q[i] & 15) | ((q[i + 16] & 15) << 4)


@njit(cache=True)
def _q5_0_block(x, y, q):
    vmax = x[0]
    for i in range(1, 32):
        if abs(x[i]) > abs(vmax):
            vmax = x[i]
    d = vmax / F32(-16)
    inv = F32(1) / d if d != 0 else F32(0)
    _put_f16(y, 0, d)
    for i in range(32):
        q[i] = min(31, int(x[i] * inv + F32(16.5)))  # (int8_t) truncates toward zero
    _put_5bit(q, y, 2)


@njit(cache=True)
def _q5_1_block(x, y, q):
    mn, mx = x[0], x[0]
    for i in range(1, 32):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
    d = (mx - mn) / F32(31)
    inv = F32(1) / d if d != 0 else F32(0)
    _put_f16(y, 0, d)
    _put_f16(y, 2, mn)
    for i in range(32):
        q[i] = min(31, int((x[i] - mn) * inv + F32(0.5)))
    _put_5bit(q, y, 4)


# ---- row drivers: x float32[rows, n] -> out uint8[rows, row_bytes] ----------------------------


@njit(cache=True, parallel=True)
def _quantize_q2_k(x, out):
    for r in prange(x.shape[0]):
        L, s = np.empty(256, F32), np.empty((3, 32), F32)
        for b in range(x.shape[1] // 256):
            _q2_k_block(x[r, 256 * b : 256 * b + 256], out[r, 84 * b : 84 * b + 84], L, s)


@njit(cache=True, parallel=True)
def _quantize_q3_k(x, out):
    for r in prange(x.shape[0]):
        L, s = np.empty(256, F32), np.empty((3, 32), F32)
        for b in range(x.shape[1] // 256):
            _q3_k_block(x[r, 256 * b : 256 * b + 256], out[r, 110 * b : 110 * b + 110], L, s)


@njit(cache=True, parallel=True)
def _quantize_q4_k(x, out):
    for r in prange(x.shape[0]):
        L, s = np.empty(256, F32), np.empty((3, 32), F32)
        for b in range(x.shape[1] // 256):
            _q4_k_block(x[r, 256 * b : 256 * b + 256], out[r, 144 * b : 144 * b + 144], L, s)


@njit(cache=True, parallel=True)
def _quantize_q5_k(x, out):
    for r in prange(x.shape[0]):
        L, s = np.empty(256, F32), np.empty((3, 32), F32)
        for b in range(x.shape[1] // 256):
            _q5_k_block(x[r, 256 * b : 256 * b + 256], out[r, 176 * b : 176 * b + 176], L, s)


@njit(cache=True, parallel=True)
def _quantize_q6_k(x, out):
    for r in prange(x.shape[0]):
        L, s = np.empty(256, F32), np.empty((3, 32), F32)
        for b in range(x.shape[1] // 256):
            _q6_k_block(x[r, 256 * b : 256 * b + 256], out[r, 210 * b : 210 * b + 210], L, s)


@njit(cache=True, parallel=True)
def _quantize_q5_0(x, out):
    for r in prange(x.shape[0]):
        q = np.empty(32, np.int64)
        for b in range(x.shape[1] // 32):
            _q5_0_block(x[r, 32 * b : 32 * b + 32], out[r, 22 * b : 22 * b + 22], q)


@njit(cache=True, parallel=True)
def _quantize_q5_1(x, out):
    for r in prange(x.shape[0]):
        q = np.empty(32, np.int64)
        for b in range(x.shape[1] // 32):
            _q5_1_block(x[r, 32 * b : 32 * b + 32], out[r, 24 * b : 24 * b + 24], q)


FAST_QUANTIZERS.update({
    GGMLType.Q2_K: _quantize_q2_k,
    GGMLType.Q3_K: _quantize_q3_k,
    GGMLType.Q4_K: _quantize_q4_k,
    GGMLType.Q5_K: _quantize_q5_k,
    GGMLType.Q6_K: _quantize_q6_k,
    GGMLType.Q5_0: _quantize_q5_0,
    GGMLType.Q5_1: _quantize_q5_1,
})  # fmt: skip
# The block kernels above hard-code these layouts.
assert (q2_k.TYPE_SIZE, q3_k.TYPE_SIZE, q4_k.TYPE_SIZE, q5_k.TYPE_SIZE, q6_k.TYPE_SIZE) == (84, 110, 144, 176, 210)
assert (q5_0.TYPE_SIZE, q5_1.TYPE_SIZE) == (22, 24)
