"""Integer block dot products for quantized weights times 8-bit activations (see actquant.py).

A row of Q8_0 or Q4_0 weights is dotted with activations quantized to blocks of 32 int8 `xq` with a
float32 scale `xd` per block, and for Q4_0's offset, `xs`: 8 int32 lanes per block, lane i holding
-8 * (xq[4i] + ... + xq[4i+3]):

    Q8_0:  row . x = sum_b  d_w[b] * xd[b] * sum_j q_w[b, j] * xq[b, j]
    Q4_0:  row . x = sum_b  d_w[b] * xd[b] * (sum_j n_w[b, j] * xq[b, j]  +  sum_i xs[b, i])   (n = nibble, q = n - 8)

The inner sums are exact in int32; the per-block scaling and the sum over blocks are float32.

With AVX2 (and F16C) the row loop is emitted as LLVM IR with x86 intrinsics, as ggml does it:
`vpmaddubsw` multiplies unsigned by signed bytes and adds pairs to int16, `vpmaddwd` by ones adds
pairs to int32, then one FMA per block into 8 float32 lanes, reduced once per row. Q8_0 weights are
signed, so |q_w| becomes the unsigned operand and the activations take q_w's sign (`vpsignb`); Q4_0
nibbles are already unsigned (0..15), so no sign trick is needed, and their -8 offset is one integer
add a block of the precomputed xs lanes to the `vpmaddwd` lanes (a float FMA per block instead, on the
multiply ports these loops are short of, made the Q4_0 rows 20 % slower). LLVM's auto-vectorizer finds
neither pattern: the float-activation numba loops these replace ran at half (Q8_0) to a fifth (Q4_0) of
this speed on one core here.

Without AVX2 the same functions are plain numba loops. The choice follows the features numba compiles
for (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the host), which also key numba's on-disk cache, so a
cached kernel never runs on a CPU without its instructions. `NUMBA_CPU_NAME=generic` forces the fallback.
"""

from __future__ import annotations

import glob
import hashlib
import os

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_TWO_M14 = np.float32(2.0**-14)
UNROLL = 4  # independent accumulators per row (see _row_loop)
PREFETCH_BLOCKS = 8  # weight blocks a row's loop asks the cache for ahead of use: ~5% (14.2 -> 14.9 GB/s a core)
Q8_0_BLOCK_BYTES = 34  # f16 d, int8 q[32]
Q4_0_BLOCK_BYTES = 18  # f16 d, 16 bytes of nibbles
Q5_0_BLOCK_BYTES = 22  # f16 d, u32 high bits, 16 bytes of nibbles


def _drop_stale_kernel_cache() -> None:
    """numba keys a cached kernel on its own file only, but kernels here inline functions from other
    files of this package (these intrinsics above all): when any of them changes, every cached kernel
    of the package is dropped, or an edit here would silently keep running the old code."""
    if config.CACHE_DIR:
        return  # a user cache dir (NUMBA_CACHE_DIR) is the user's to clear
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + f.read())
    cache = os.path.join(here, "__pycache__")
    if not os.path.isdir(cache):
        return
    stamp = os.path.join(cache, "r1cpu-kernel-sources.sha256")
    try:
        with open(stamp) as f:
            if f.read() == digest.hexdigest():
                return
    except OSError:
        pass
    try:
        for path in glob.glob(os.path.join(cache, "*.nb[ic]")):
            os.remove(path)
        with open(stamp, "w") as f:
            f.write(digest.hexdigest())
    except OSError:  # read-only install: numba then compiles in memory
        pass


_drop_stale_kernel_cache()


def target_features() -> frozenset[str]:
    """The CPU features numba compiles for, by the rule numba's codegen applies."""
    if config.CPU_FEATURES is not None:
        flat = config.CPU_FEATURES
    else:
        flat = ll.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in flat.split(",") if f.startswith("+"))


FEATURES = target_features()
SIMD = "avx2" if {"avx2", "f16c", "fma"} <= FEATURES else "generic"

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16I8, _V32I8 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32)
_V16I16, _V8I32, _V8F32 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)


# ---- IR helpers (shared by every AVX2 row loop) ------------------------------------------------


def _x86(builder, name, ret, args, values):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)
    return builder.call(fn, values)


def _maddubs_i32(builder, u8, s8):
    """<32 x u8> times <32 x i8> -> <8 x i32>, each lane the sum of 4 adjacent products (no overflow
    for |u8| <= 128, |s8| <= 127)."""
    p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8], [u8, s8])
    ones = ir.Constant(_V16I16, [1] * 16)
    return _x86(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16], [p16, ones])


def _sign(builder, a, b):
    """a with b's sign applied per byte (zero where b is zero): vpsignb."""
    return _x86(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8], [a, b])


def _data(context, builder, aryty, ary, offset):
    """Pointer to element `offset` of a (C-contiguous) array argument."""
    return builder.gep(cgutils.create_struct_proxy(aryty)(context, builder, value=ary).data, [offset])


def _load(builder, ptr, vty):
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _f16_scale(builder, block_ptr):
    return builder.fpext(builder.bitcast(_load(builder, block_ptr, _I16), ir.HalfType()), _F32)


def _splat(builder, f):
    v = builder.insert_element(ir.Constant(_V8F32, None), f, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_V8I32, [0] * 8))


def _nibbles(builder, qs_ptr):
    """16 bytes of nibbles (byte j: element j low, element j + 16 high) -> <32 x u8> elements 0..31:
    the bytes loaded into both 128-bit halves (`vbroadcasti128`), the upper half shifted right by 4
    (`vpsrlvd`), then masked: two ALU operations where splitting and joining halves took three."""
    v4 = _load(builder, qs_ptr, ir.VectorType(_I32, 4))
    v8 = builder.shuffle_vector(v4, v4, ir.Constant(_V8I32, [0, 1, 2, 3, 0, 1, 2, 3]))
    v8 = builder.lshr(v8, ir.Constant(_V8I32, [0] * 4 + [4] * 4))
    return builder.and_(builder.bitcast(v8, _V32I8), ir.Constant(_V32I8, [15] * 32))


def _prefetch(builder, ptr):
    """Read-prefetch into all cache levels (a hint: past the end of the weights it is harmless)."""
    _x86(builder, "llvm.prefetch.p0i8", ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32],
         [builder.bitcast(ptr, ir.IntType(8).as_pointer()), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
          ir.Constant(_I32, 1)])  # fmt: skip


def _hsum(builder, v):
    """Sum of the 8 lanes (float or int): halves folded (4 + 4, 2 + 2, 1 + 1) as ggml's hsum_float_8."""
    add = builder.add if isinstance(v.type.element, ir.IntType) else builder.fadd
    for width in (4, 2, 1):
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), list(range(width, 2 * width))))
        v = add(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _row_loop(context, builder, sig, args, block_bytes, block_dot):
    """Shared frame of the row dot products: pointers, float32 lane accumulators, the block loop.

    args: (w, w_off, xq, x_off, xd, d_off, n_blocks[, xs]). block_dot(builder, wb, xb, b) returns the
    block's <8 x i32> integer sums. Blocks go round-robin to UNROLL accumulators: one would chain
    every block's FMA on the previous one (5 cycles on Zen 3), a bound of ~16.7 GB/s of Q8_0 per core
    at 2.45 GHz; cores here reach ~15 either way.
    """
    w, w_off, xq, x_off, xd, d_off, n_blocks = args[:7]
    w_ptr = _data(context, builder, sig.args[0], w, w_off)
    xq_ptr = _data(context, builder, sig.args[2], xq, x_off)
    xd_ptr = _data(context, builder, sig.args[4], xd, d_off)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8F32, None)) for _ in range(UNROLL)]

    def block(b, acc):
        wb = builder.gep(w_ptr, [builder.mul(b, ir.Constant(b.type, block_bytes))])
        xb = builder.gep(xq_ptr, [builder.mul(b, ir.Constant(b.type, 32))])
        isum = block_dot(builder, builder.gep(wb, [ir.Constant(b.type, 2)]), xb, b)
        d = builder.fmul(_f16_scale(builder, wb), builder.load(builder.gep(xd_ptr, [b])))
        prod = builder.fmul(_splat(builder, d), builder.sitofp(isum, _V8F32), flags=["contract"])
        builder.store(builder.fadd(builder.load(acc), prod, flags=["contract"]), acc)

    b_type = n_blocks.type
    unroll, ahead = ir.Constant(b_type, UNROLL), ir.Constant(b_type, PREFETCH_BLOCKS)
    n_main = builder.udiv(n_blocks, unroll)
    with cgutils.for_range(builder, n_main) as loop:
        first = builder.mul(loop.index, unroll)
        _prefetch(builder, builder.gep(w_ptr, [builder.mul(builder.add(first, ahead), ir.Constant(b_type, block_bytes))]))
        for u in range(UNROLL):
            block(builder.add(first, ir.Constant(b_type, u)), accs[u])
    with cgutils.for_range_slice(builder, builder.mul(n_main, unroll), n_blocks, ir.Constant(b_type, 1)) as (b, _):
        block(b, accs[0])
    acc = builder.load(accs[0])
    for u in range(1, UNROLL):
        acc = builder.fadd(acc, builder.load(accs[u]))
    return _hsum(builder, acc)


# ---- AVX2 row dot products ---------------------------------------------------------------------


@intrinsic
def _dot_q8_0_avx2(typingctx, w, w_off, xq, x_off, xd, d_off, n_blocks):
    sig = types.float32(w, w_off, xq, x_off, xd, d_off, n_blocks)

    def block_dot(builder, qw_ptr, xb, b):
        qw, qx = _load(builder, qw_ptr, _V32I8), _load(builder, xb, _V32I8)
        return _maddubs_i32(builder, _sign(builder, qw, qw), _sign(builder, qx, qw))

    def codegen(context, builder, signature, args):
        return _row_loop(context, builder, signature, args, Q8_0_BLOCK_BYTES, block_dot)

    return sig, codegen


@intrinsic
def _dot_q4_0_avx2(typingctx, w, w_off, xq, x_off, xd, d_off, n_blocks, xs):
    sig = types.float32(w, w_off, xq, x_off, xd, d_off, n_blocks, xs)

    def codegen(context, builder, signature, args):
        d_off = args[5]
        xs_ptr = _data(context, builder, signature.args[7], args[7], builder.mul(d_off, ir.Constant(d_off.type, 8)))

        def block_dot(builder, qs_ptr, xb, b):
            nib = _nibbles(builder, qs_ptr)
            lanes = _load(builder, builder.gep(xs_ptr, [builder.mul(b, ir.Constant(b.type, 8))]), _V8I32)
            return builder.add(_maddubs_i32(builder, nib, _load(builder, xb, _V32I8)), lanes)

        return _row_loop(context, builder, signature, args, Q4_0_BLOCK_BYTES, block_dot)

    return sig, codegen


@intrinsic
def _dot_q5_0_avx2(typingctx, w, w_off, xq, x_off, xd, d_off, n_blocks, xs):
    """Q5_0 (f16 d, 32 high bits qh, 16 bytes of low nibbles; q = n | h << 4, weight d (q - 16)):
    the high bits become bytes of 16 (a byte shuffle, mask, compare), the offset is twice Q4_0's lanes."""
    sig = types.float32(w, w_off, xq, x_off, xd, d_off, n_blocks, xs)

    def codegen(context, builder, signature, args):
        d_off = args[5]
        xs_ptr = _data(context, builder, signature.args[7], args[7], builder.mul(d_off, ir.Constant(d_off.type, 8)))
        bit = ir.Constant(_V32I8, [1 << (e % 8) for e in range(32)])

        def block_dot(builder, qh_ptr, xb, b):
            qh = builder.bitcast(_load(builder, qh_ptr, _I32), ir.VectorType(_I8, 4))
            spread = builder.shuffle_vector(qh, qh, ir.Constant(ir.VectorType(_I32, 32), [e // 8 for e in range(32)]))
            high = builder.select(builder.icmp_unsigned("==", builder.and_(spread, bit), bit),
                                  ir.Constant(_V32I8, [16] * 32), ir.Constant(_V32I8, [0] * 32))  # fmt: skip
            q = builder.or_(_nibbles(builder, builder.gep(qh_ptr, [ir.Constant(b.type, 4)])), high)
            lanes = _load(builder, builder.gep(xs_ptr, [builder.mul(b, ir.Constant(b.type, 8))]), _V8I32)
            twice = builder.shl(lanes, ir.Constant(_V8I32, [1] * 8))  # the offset is 16, Q4_0's is 8
            return builder.add(_maddubs_i32(builder, q, _load(builder, xb, _V32I8)), twice)

        return _row_loop(context, builder, signature, args, Q5_0_BLOCK_BYTES, block_dot)

    return sig, codegen


# ---- AVX2 row decoders (prefill tiles: rows to float32 for sgemm) -------------------------------
# float32(q) * d per element, as the portable loops below, so both give the same bits; LLVM turns
# the <32 x i8> -> <32 x float> conversion into vpmovsxbd + vcvtdq2ps, where numba's loops stayed scalar.

_V32F32 = ir.VectorType(_F32, 32)


def _decode_loop(context, builder, sig, args, block_bytes, block_ints):
    """y[32b + j] = float32(block_ints(b)[j]) * d_b for b < n_blocks; block_ints returns <32 x i8>."""
    y, a, n_blocks = args
    y_ptr = _data(context, builder, sig.args[0], y, ir.Constant(_I64, 0))
    a_ptr = _data(context, builder, sig.args[1], a, ir.Constant(_I64, 0))
    with cgutils.for_range(builder, n_blocks) as loop:
        b = loop.index
        ab = builder.gep(a_ptr, [builder.mul(b, ir.Constant(b.type, block_bytes))])
        d = builder.insert_element(ir.Constant(_V32F32, None), _f16_scale(builder, ab), ir.Constant(_I32, 0))
        d = builder.shuffle_vector(d, d, ir.Constant(ir.VectorType(_I32, 32), [0] * 32))
        f = builder.fmul(builder.sitofp(block_ints(builder, builder.gep(ab, [ir.Constant(b.type, 2)])), _V32F32), d)
        out = builder.gep(y_ptr, [builder.mul(b, ir.Constant(b.type, 32))])
        builder.store(f, builder.bitcast(out, _V32F32.as_pointer()), align=4)
    return context.get_dummy_value()


@intrinsic
def _decode_q8_0_avx2(typingctx, y, a, n_blocks):
    sig = types.void(y, a, n_blocks)

    def codegen(context, builder, signature, args):
        return _decode_loop(context, builder, signature, args, Q8_0_BLOCK_BYTES, lambda bld, q: _load(bld, q, _V32I8))

    return sig, codegen


@intrinsic
def _decode_q4_0_avx2(typingctx, y, a, n_blocks):
    sig = types.void(y, a, n_blocks)

    def nibbles(builder, qs_ptr):  # byte j: element j low, element j + 16 high; minus 8
        return builder.sub(_nibbles(builder, qs_ptr), ir.Constant(_V32I8, [8] * 32))

    def codegen(context, builder, signature, args):
        return _decode_loop(context, builder, signature, args, Q4_0_BLOCK_BYTES, nibbles)

    return sig, codegen


# ---- portable row dot products (same arguments) ------------------------------------------------


@njit(cache=True)
def f16_to_f32(h):
    """IEEE binary16 bits (held in any int) -> float32, exact for zero, subnormals, inf and nan.
    Branch-free after LLVM's if-conversion, so the F16 matvec vectorizes."""
    em = np.int64(h) & 0x7FFF
    f = np.uint32((em << 13) + 0x38000000).view(np.float32)  # normal: rebias exponent 15 -> 127
    if em < 0x0400:  # zero / subnormal: 2**-14 * (1 + m/1024) - 2**-14 = m * 2**-24, exact
        f = np.uint32((em << 13) + 0x38800000).view(np.float32) - _TWO_M14
    elif em >= 0x7C00:  # inf / nan: the all-ones exponent stays all-ones, payload kept
        f = np.uint32((em << 13) | 0x7F800000).view(np.float32)
    return -f if np.int64(h) & 0x8000 else f


@intrinsic
def _at(typingctx, ary, offset):
    """ary's element `offset` elements past its data pointer, whatever its shape and strides (the
    flat addressing the SIMD loops use)."""
    sig = ary.dtype(ary, offset)

    def codegen(context, builder, signature, args):
        return builder.load(_data(context, builder, signature.args[0], args[0], args[1]))

    return sig, codegen


@njit(cache=True, inline="always")
def _f16_bits_at(w, o):
    return f16_to_f32(np.int64(_at(w, o)) | (np.int64(_at(w, o + 1)) << 8))


@njit(cache=True, inline="always")
def _dot_q8_0_generic(w, w_off, xq, x_off, xd, d_off, n_blocks):
    s = np.float32(0.0)
    for b in range(n_blocks):
        o, xo = w_off + b * Q8_0_BLOCK_BYTES, x_off + b * 32
        p = np.int32(0)
        for j in range(32):
            p += np.int32(np.int8(_at(w, o + 2 + j))) * np.int32(_at(xq, xo + j))
        s += _f16_bits_at(w, o) * (_at(xd, d_off + b) * np.float32(p))
    return s


@njit(cache=True, inline="always")
def _dot_q4_0_generic(w, w_off, xq, x_off, xd, d_off, n_blocks, xs):
    s = np.float32(0.0)
    for b in range(n_blocks):
        o, xo = w_off + b * Q4_0_BLOCK_BYTES, x_off + b * 32
        p = np.int32(0)
        for j in range(16):
            byte = np.int32(_at(w, o + 2 + j))
            p += (byte & 15) * np.int32(_at(xq, xo + j)) + (byte >> 4) * np.int32(_at(xq, xo + 16 + j))
        for i in range(8):
            p += _at(xs, (d_off + b) * 8 + i)
        s += _f16_bits_at(w, o) * (_at(xd, d_off + b) * np.float32(p))
    return s


@njit(cache=True, inline="always")
def _u32_at(w, o):
    """Little-endian uint32 at flat byte offset o, as int64."""
    lo = np.int64(_at(w, o)) | np.int64(_at(w, o + 1)) << 8
    return lo | np.int64(_at(w, o + 2)) << 16 | np.int64(_at(w, o + 3)) << 24


@njit(cache=True, inline="always")
def _dot_q5_0_generic(w, w_off, xq, x_off, xd, d_off, n_blocks, xs):
    s = np.float32(0.0)
    for b in range(n_blocks):
        o, xo = w_off + b * Q5_0_BLOCK_BYTES, x_off + b * 32
        qh = _u32_at(w, o + 2)
        p = np.int32(0)
        for j in range(16):
            byte = np.int32(_at(w, o + 6 + j))
            lo, hi = (byte & 15) | np.int32((qh >> j) & 1) << 4, (byte >> 4) | np.int32((qh >> (j + 16)) & 1) << 4
            p += lo * np.int32(_at(xq, xo + j)) + hi * np.int32(_at(xq, xo + 16 + j))
        for i in range(8):
            p += 2 * _at(xs, (d_off + b) * 8 + i)
        s += _f16_bits_at(w, o) * (_at(xd, d_off + b) * np.float32(p))
    return s


@njit(cache=True, inline="always")
def _decode_q8_0_generic(y, a, n_blocks):
    for b in range(n_blocks):
        d = _f16_bits_at(a, b * Q8_0_BLOCK_BYTES)
        for j in range(32):
            y[b * 32 + j] = np.float32(np.int8(a[b * Q8_0_BLOCK_BYTES + 2 + j])) * d


@njit(cache=True, inline="always")
def _decode_q4_0_generic(y, a, n_blocks):
    for b in range(n_blocks):
        d = _f16_bits_at(a, b * Q4_0_BLOCK_BYTES)
        for j in range(16):
            q = np.int64(a[b * Q4_0_BLOCK_BYTES + 2 + j])
            y[b * 32 + j] = np.float32((q & 15) - 8) * d
            y[b * 32 + 16 + j] = np.float32((q >> 4) - 8) * d


# Row decoders: y float32 (32 * n_blocks,) from one row a uint8 of Q8_0 / Q4_0 blocks (both C-contiguous).
decode_q8_0 = _decode_q8_0_avx2 if SIMD == "avx2" else _decode_q8_0_generic
decode_q4_0 = _decode_q4_0_avx2 if SIMD == "avx2" else _decode_q4_0_generic

# The row dot products every quantized kernel calls. Arguments: w flat uint8 weights and the byte
# offset of the row; xq int8 activations and the element offset of the row's first column; xd float32
# per block and xs 8 int32 lanes per block (actquant.py), both at block offset d_off = x_off // 32;
# n_blocks = columns / 32.
dot_q8_0 = _dot_q8_0_avx2 if SIMD == "avx2" else _dot_q8_0_generic
dot_q4_0 = _dot_q4_0_avx2 if SIMD == "avx2" else _dot_q4_0_generic
dot_q5_0 = _dot_q5_0_avx2 if SIMD == "avx2" else _dot_q5_0_generic

# Kind ids of storage formats inside kernels that take several (fused MoE, MLA decode, prefill tiles).
# Q8_0 and Q4_0 have integer dot products with 8-bit activations here; the float kinds and the
# k-quant family are decoded rows in those kernels (their products live in kquant_int.py / kquants.py).
KIND_Q8_0, KIND_Q4_0, KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2, 3, 4
KIND_Q2_K, KIND_Q3_K, KIND_Q4_K, KIND_Q5_K, KIND_Q6_K, KIND_Q5_0, KIND_Q5_1 = 5, 6, 7, 8, 9, 10, 11


@njit(cache=True, inline="always")
def dot_row(kind, w, w_off, xq, x_off, xd, xs, d_off, n_blocks):
    """One weight row of format `kind` dotted with quantized activations (the branch is per row)."""
    if kind == KIND_Q8_0:
        return dot_q8_0(w, w_off, xq, x_off, xd, d_off, n_blocks)
    return dot_q4_0(w, w_off, xq, x_off, xd, d_off, n_blocks, xs)
