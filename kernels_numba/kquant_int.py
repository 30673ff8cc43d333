"""Integer products for the k-quant family: Q4_K and Q6_K rows times 8-bit activations in 256-blocks
(ggml's Q8_K), as ggml does it; Q5_0 (their 32-block fallback) on actquant's 32-blocks like Q4_0.

x float32[D] (D % 256 == 0) is quantized once per product, per 256-block s:
    dx[s] = max |x| / 127,   xq = round(x / dx) int8,   bs[16 s + k] = sum of xq over elements 16k..16k+15
Then a weight super-block costs one float multiply-add; each sub-block sum is exact in int32 with its
integer scale applied by `vpmaddwd` (scale times the `vpmaddubsw` pair sums, where Q8_0/Q4_0 multiply by 1):
    Q4_K: d dx sum_j sc_j (sum_{i in j} q_i xq_i)  -  dmin dx sum_j m_j (bs[2j] + bs[2j+1])   (j: 8 of 32)
    Q6_K: d dx sum_k sc_k (sum_{i in k} q_i xq_i  -  32 bs[k])                               (k: 16 of 16)
Overflow: |q x| pair sums stay under 2 * 63 * 127 in int16, times |sc| <= 127 twice under 2^22 in int32.
Byte layouts are those of quant/q4_k.py and quant/q6_k.py. With AVX2 the super-block sums are LLVM IR
(intrinsics.py's helpers); without, plain numba loops give the same integers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from r1cpu.kernels_numba.actquant import LANES, QK, quantize_block
from r1cpu.kernels_numba.intrinsics import SIMD, _at, _data, _f16_bits_at, _hsum, _load, _u32_at, _x86, dot_q5_0

QK_K = 256
Q4_K_BYTES, Q6_K_BYTES = 144, 210
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V8I8, _V16I8, _V32I8 = ir.VectorType(_I8, 8), ir.VectorType(_I8, 16), ir.VectorType(_I8, 32)
_V8I16, _V16I16, _V8I32 = ir.VectorType(_I16, 8), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)


@njit(cache=True)
def quantize_q8k(x):
    """x float32[D] -> (xq int8[D], dx float32[D/256], bs int16[D/16]), as the module docstring says
    (|bs| <= 16 * 127 fits int16, so the sub-block sums meet the scales in one `vpmaddwd`)."""
    q = np.empty(x.size, np.int8)
    dx = np.empty(x.size // QK_K, np.float32)
    bs = np.empty(x.size // 16, np.int16)
    for s in range(dx.size):
        amax = np.float32(0.0)
        for i in range(s * QK_K, (s + 1) * QK_K):
            amax = max(amax, abs(x[i]))
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        dx[s] = amax / np.float32(127.0)
        for k in range(16 * s, 16 * s + 16):
            total = np.int32(0)
            for i in range(16 * k, 16 * k + 16):
                v = np.int32(np.rint(x[i] * inv))
                q[i] = v
                total += v
            bs[k] = total
    return q, dx, bs


# ---- integer super-block sums: AVX2 IR ---------------------------------------------------------


def _maddubs(builder, u8, s8):
    return _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8], [u8, s8])


def _scaled(builder, p16, sc16, lanes):
    """vpmaddwd of the int16 pair sums by int16 scales picked from sc16 (one per 8 lanes here)."""
    scale = builder.shuffle_vector(sc16, sc16, ir.Constant(ir.VectorType(_I32, 16), lanes))
    return _x86(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16], [p16, scale])


def _splat8(value):
    return ir.Constant(_V32I8, [value] * 32)


@intrinsic
def _isum_q4_k_avx2(typingctx, w, w_off, xq, x_off, scales):
    """sum_j sc_j sum_{i in j} q_i xq_i of the Q4_K super-block at byte w_off (scales: sc_j in byte j)."""
    sig = types.int32(w, w_off, xq, x_off, scales)

    def codegen(context, builder, signature, args):
        qs = _data(context, builder, signature.args[0], args[0], builder.add(args[1], ir.Constant(args[1].type, 16)))
        xp = _data(context, builder, signature.args[2], args[2], args[3])
        sc16 = builder.zext(builder.bitcast(args[4], _V8I8), _V8I16)
        sc16 = builder.shuffle_vector(sc16, sc16, ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
        acc = ir.Constant(_V8I32, None)
        for c in range(4):  # 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones
            packed = _load(builder, builder.gep(qs, [ir.Constant(_I64, 32 * c)]), _V32I8)
            lo, hi = builder.and_(packed, _splat8(15)), builder.lshr(packed, _splat8(4))
            p_lo = _maddubs(builder, lo, _load(builder, builder.gep(xp, [ir.Constant(_I64, 64 * c)]), _V32I8))
            p_hi = _maddubs(builder, hi, _load(builder, builder.gep(xp, [ir.Constant(_I64, 64 * c + 32)]), _V32I8))
            acc = builder.add(acc, _scaled(builder, p_lo, sc16, [2 * c] * 16))
            acc = builder.add(acc, _scaled(builder, p_hi, sc16, [2 * c + 1] * 16))
        return _hsum(builder, acc)

    return sig, codegen


@intrinsic
def _isum_q6_k_avx2(typingctx, w, w_off, xq, x_off):
    """sum_k sc_k sum_{i in k} q_i xq_i of the Q6_K super-block at byte w_off (q in 0..63, offset not applied)."""
    sig = types.int32(w, w_off, xq, x_off)

    def codegen(context, builder, signature, args):
        blk = _data(context, builder, signature.args[0], args[0], args[1])
        xp = _data(context, builder, signature.args[2], args[2], args[3])
        sc16 = builder.sext(_load(builder, builder.gep(blk, [ir.Constant(_I64, 192)]), _V16I8), _V16I16)
        acc = ir.Constant(_V8I32, None)
        for h in range(2):  # ql[l], ql[l + 32], qh[l] hold elements 128h + 32k + l, k = 0..3
            a = _load(builder, builder.gep(blk, [ir.Constant(_I64, 64 * h)]), _V32I8)
            b = _load(builder, builder.gep(blk, [ir.Constant(_I64, 64 * h + 32)]), _V32I8)
            hb = _load(builder, builder.gep(blk, [ir.Constant(_I64, 128 + 32 * h)]), _V32I8)
            low = (builder.and_(a, _splat8(15)), builder.and_(b, _splat8(15)), builder.lshr(a, _splat8(4)),
                   builder.lshr(b, _splat8(4)))  # fmt: skip
            for k in range(4):
                high = builder.and_(builder.lshr(hb, _splat8(2 * k)), _splat8(3))
                q = builder.or_(low[k], builder.shl(high, _splat8(4)))
                x = _load(builder, builder.gep(xp, [ir.Constant(_I64, 128 * h + 32 * k)]), _V32I8)
                sub = 8 * h + 2 * k  # 16-element sub-blocks: lanes 0-7 of the pair sums, then 8-15
                acc = builder.add(acc, _scaled(builder, _maddubs(builder, q, x), sc16, [sub] * 8 + [sub + 1] * 8))
        return _hsum(builder, acc)

    return sig, codegen


def _bs16(context, builder, sig, bs, bs_off):
    return _load(builder, _data(context, builder, sig, bs, bs_off), _V16I16)


@intrinsic
def _mins_dot_q4_k_avx2(typingctx, bs, bs_off, mins):
    """sum_j m_j (bs[2j] + bs[2j+1]) over a super-block's 16 block sums at bs_off (mins: m_j in byte j)."""
    sig = types.int32(bs, bs_off, mins)

    def codegen(context, builder, signature, args):
        m16 = builder.zext(builder.bitcast(args[2], _V8I8), _V8I16)
        m16 = builder.shuffle_vector(m16, m16, ir.Constant(ir.VectorType(_I32, 16), [j // 2 for j in range(16)]))
        sums = _x86(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16],
                    [_bs16(context, builder, signature.args[0], args[0], args[1]), m16])  # fmt: skip
        return _hsum(builder, sums)

    return sig, codegen


@intrinsic
def _offset_q6_k_avx2(typingctx, w, w_off, bs, bs_off):
    """sum_k sc_k bs[k] of the Q6_K super-block at byte w_off (its 16 int8 scales at +192)."""
    sig = types.int32(w, w_off, bs, bs_off)

    def codegen(context, builder, signature, args):
        sc_ptr = _data(context, builder, signature.args[0], args[0], builder.add(args[1], ir.Constant(args[1].type, 192)))
        sc16 = builder.sext(_load(builder, sc_ptr, _V16I8), _V16I16)
        sums = _x86(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16],
                    [_bs16(context, builder, signature.args[2], args[2], args[3]), sc16])  # fmt: skip
        return _hsum(builder, sums)

    return sig, codegen


# ---- the same sums, portable ------------------------------------------------------------------


@njit(cache=True, inline="always")
def _isum_q4_k_generic(w, w_off, xq, x_off, scales):
    total = np.int32(0)
    for c in range(4):
        p_lo = p_hi = np.int32(0)
        for i in range(32):
            v = np.int32(_at(w, w_off + 16 + 32 * c + i))
            p_lo += (v & 15) * np.int32(_at(xq, x_off + 64 * c + i))
            p_hi += (v >> 4) * np.int32(_at(xq, x_off + 64 * c + 32 + i))
        total += np.int32((scales >> (16 * c)) & 255) * p_lo + np.int32((scales >> (16 * c + 8)) & 255) * p_hi
    return total


@njit(cache=True, inline="always")
def _isum_q6_k_generic(w, w_off, xq, x_off):
    total = np.int32(0)
    for e in range(QK_K):
        h, k, l = e // 128, (e % 128) // 32, e % 32
        low = np.int32(_at(w, w_off + 64 * h + 32 * (k % 2) + l)) >> (4 * (k // 2)) & 15
        high = (np.int32(_at(w, w_off + 128 + 32 * h + l)) >> (2 * k)) & 3
        total += np.int32(np.int8(_at(w, w_off + 192 + e // 16))) * (low | (high << 4)) * np.int32(_at(xq, x_off + e))
    return total


@njit(cache=True, inline="always")
def _mins_dot_q4_k_generic(bs, bs_off, mins):
    total = np.int32(0)
    for j in range(8):
        total += np.int32((mins >> (8 * j)) & 255) * (np.int32(bs[bs_off + 2 * j]) + np.int32(bs[bs_off + 2 * j + 1]))
    return total


@njit(cache=True, inline="always")
def _offset_q6_k_generic(w, w_off, bs, bs_off):
    total = np.int32(0)
    for k in range(16):
        total += np.int32(np.int8(_at(w, w_off + 192 + k))) * np.int32(bs[bs_off + k])
    return total


isum_q4_k = _isum_q4_k_avx2 if SIMD == "avx2" else _isum_q4_k_generic
mins_dot_q4_k = _mins_dot_q4_k_avx2 if SIMD == "avx2" else _mins_dot_q4_k_generic
offset_q6_k = _offset_q6_k_avx2 if SIMD == "avx2" else _offset_q6_k_generic
isum_q6_k = _isum_q6_k_avx2 if SIMD == "avx2" else _isum_q6_k_generic


# ---- rows and products --------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _scales_mins_q4_k(w, o):
    """The 8 six-bit scales and 8 mins packed in the 12 bytes at w[o:], one per byte of two int64
    (ggml's kmask unpacking: bytes 0-3 hold sc 0-3 and the top bits of sc 4-7, 4-7 the same for m)."""
    u0, u1, u2 = _u32_at(w, o), _u32_at(w, o + 4), _u32_at(w, o + 8)
    sc = (u0 & 0x3F3F3F3F) | (((u2 & 0x0F0F0F0F) | (((u0 >> 6) & 0x03030303) << 4)) << 32)
    m = (u1 & 0x3F3F3F3F) | ((((u2 >> 4) & 0x0F0F0F0F) | (((u1 >> 6) & 0x03030303) << 4)) << 32)
    return sc, m


@njit(cache=True, inline="always")
def _row_q4_k(w, w_off, xq, dx, bs):
    acc = np.float32(0.0)
    for s in range(dx.size):
        o = w_off + s * Q4_K_BYTES
        sc, m = _scales_mins_q4_k(w, o + 4)
        mins = mins_dot_q4_k(bs, 16 * s, m)
        isum = isum_q4_k(w, o, xq, s * QK_K, sc)
        acc += dx[s] * (_f16_bits_at(w, o) * np.float32(isum) - _f16_bits_at(w, o + 2) * np.float32(mins))
    return acc


@njit(cache=True, inline="always")
def _row_q6_k(w, w_off, xq, dx, bs):
    acc = np.float32(0.0)
    for s in range(dx.size):
        o = w_off + s * Q6_K_BYTES
        offset = offset_q6_k(w, o, bs, 16 * s)
        isum = isum_q6_k(w, o, xq, s * QK_K)
        acc += dx[s] * (_f16_bits_at(w, o + 208) * np.float32(isum - 32 * offset))
    return acc


# Rows per parallel task, as qlinear.CHUNK_ROWS: one task a row ran a 13 MB Q4_K matvec 1.4x slower.
CHUNK_ROWS = 16


@njit(cache=True, parallel=True)
def matvec_q4_k(out, w, x):
    """out float32[rows] = w (rows, row_bytes) Q4_K times x float32[D], x quantized once to Q8_K."""
    xq, dx, bs = quantize_q8k(x)
    n = w.shape[0]
    for c in prange((n + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(n, (c + 1) * CHUNK_ROWS)):
            out[r] = _row_q4_k(w, r * w.shape[1], xq, dx, bs)


@njit(cache=True, parallel=True)
def matvec_q6_k(out, w, x):
    """out float32[rows] = w (rows, row_bytes) Q6_K times x float32[D], x quantized once to Q8_K."""
    xq, dx, bs = quantize_q8k(x)
    n = w.shape[0]
    for c in prange((n + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(n, (c + 1) * CHUNK_ROWS)):
            out[r] = _row_q6_k(w, r * w.shape[1], xq, dx, bs)


@njit(cache=True, parallel=True)
def matvec_q5_0(out, w, x):
    """out float32[rows] = w (rows, row_bytes) Q5_0 times x float32[D], x quantized once to 32-blocks."""
    nb = x.size // QK
    xq, xd, xs = np.empty(x.size, np.int8), np.empty(nb, np.float32), np.empty(nb * LANES, np.int32)
    for b in range(nb):
        quantize_block(xq, xd, xs, x, b * QK, b)
    n = w.shape[0]
    for c in prange((n + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(n, (c + 1) * CHUNK_ROWS)):
            out[r] = dot_q5_0(w, r * w.shape[1], xq, 0, xd, 0, nb, xs)
