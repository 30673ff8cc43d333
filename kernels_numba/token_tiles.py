"""Q4_0 weights times 8-bit activations of many tokens (prefill), 8 tokens to a vector.

The row kernels (intrinsics.dot_row) spread one block's 32 products over 8 int32 lanes and pay a
horizontal sum, a conversion and a scale per (row, block, token): ~10 vector operations for 32
multiply-adds, a third of sgemm's rate. Here lane j is token j instead. Activations are laid out in
tiles of 8 tokens:

    at[t, b, g, 4j + k] = q(token 8t + j)[32b + 4g + k]     int8, g < 8 groups of 4, k < 4
    ad[t, b, j] = d(token 8t + j)[b]                         float32 block scales
    ao[t, b, j] = -8 * sum of q(token 8t + j) over block b   int32, Q4_0's offset (actquant.py)

and a weight block (16 bytes of nibbles) is unpacked once, its group g broadcast to all lanes
(`vpermd`), so one `vpmaddubsw` multiplies 4 weights by 4 activations of 8 tokens at once. The 8
groups add up in int16 (|sum| <= 8 * 2 * 15 * 127 < 2^15), one `vpmaddwd` makes int32, and the offset,
conversion and scale are per 8 tokens. Two tiles share each unpacked block. The sums are the row
kernels' to float32 rounding; on one core here a 48-token expert product (1408 x 2048) ran at 140
GFLOP/s against 66 for decoding the weights to float32 and sgemm.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from r1cpu.kernels_numba import intrinsics as I
from r1cpu.kernels_numba.actquant import LANES, QK, quantize_block

TILE = 8  # tokens a tile (int32 lanes of a 256-bit vector)
GROUPS = QK // 4  # 4-byte groups a block
TILE_BLOCK_BYTES = GROUPS * TILE * 4  # one block of one tile: 256 bytes


@njit(cache=True, inline="always")
def quantize_tiles(x, n, at, ad, ao, q, d, s):
    """x float32 (>= n, D) rows 0..n-1 -> tiles at int8 (tiles, D/32, 8, 32), ad float32 and ao int32
    (tiles, D/32, 8); padding tokens are zero. q, d, s: one token's scratch (D, D/32, 8 D/32)."""
    nb = x.shape[1] // QK
    for t in range(at.shape[0]):
        for j in range(TILE):
            i = TILE * t + j
            if i < n:
                for b in range(nb):
                    quantize_block(q, d, s, x[i], b * QK, b)
            for b in range(nb):
                total = 0
                for g in range(GROUPS):
                    for k in range(4):
                        at[t, b, g, 4 * j + k] = q[QK * b + 4 * g + k] if i < n else 0
                    total += s[LANES * b + g] if i < n else 0
                ad[t, b, j] = d[b] if i < n else np.float32(0.0)
                ao[t, b, j] = total


def _tile_loop(context, builder, sig, args, n_tiles):
    """IR of tile_dot: n_tiles accumulators <8 x float>, the block loop, the results stored."""
    w, w_off, at, ad, ao, t_off, nb, out = args
    w_ptr = I._data(context, builder, sig.args[0], w, w_off)
    at_ptr = I._data(context, builder, sig.args[2], at, builder.mul(t_off, ir.Constant(t_off.type, TILE_BLOCK_BYTES)))
    ad_ptr = I._data(context, builder, sig.args[3], ad, builder.mul(t_off, ir.Constant(t_off.type, TILE)))
    ao_ptr = I._data(context, builder, sig.args[4], ao, builder.mul(t_off, ir.Constant(t_off.type, TILE)))
    accs = [cgutils.alloca_once_value(builder, ir.Constant(I._V8F32, [0.0] * 8)) for _ in range(n_tiles)]
    const = lambda v: ir.Constant(nb.type, v)  # noqa: E731
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        wb = builder.gep(w_ptr, [builder.mul(b, const(I.Q4_0_BLOCK_BYTES))])
        nib = builder.bitcast(I._nibbles(builder, builder.gep(wb, [const(2)])), I._V8I32)
        groups = [builder.bitcast(builder.shuffle_vector(nib, nib, ir.Constant(I._V8I32, [g] * 8)), I._V32I8)
                  for g in range(GROUPS)]  # fmt: skip
        d_w = I._splat(builder, I._f16_scale(builder, wb))
        for t in range(n_tiles):
            tb = builder.add(builder.mul(const(t), nb), b)  # tile t's block b, counted in blocks
            isum = _block_sums(builder, groups, builder.gep(at_ptr, [builder.mul(tb, const(TILE_BLOCK_BYTES))]))
            isum = builder.add(isum, I._load(builder, builder.gep(ao_ptr, [builder.mul(tb, const(TILE))]), I._V8I32))
            d = builder.fmul(d_w, I._load(builder, builder.gep(ad_ptr, [builder.mul(tb, const(TILE))]), I._V8F32))
            prod = builder.fmul(d, builder.sitofp(isum, I._V8F32), flags=["contract"])
            builder.store(builder.fadd(builder.load(accs[t]), prod, flags=["contract"]), accs[t])
    out_ptr = I._data(context, builder, sig.args[7], out, ir.Constant(nb.type, 0))
    for t in range(n_tiles):
        dest = builder.bitcast(builder.gep(out_ptr, [const(TILE * t)]), I._V8F32.as_pointer())
        builder.store(builder.load(accs[t]), dest, align=4)


def _block_sums(builder, groups, a_ptr):
    """<8 x i32>: lane j = sum over the block's 32 columns of nibble * activation of token j."""
    s16 = None
    for g, wg in enumerate(groups):
        a = I._load(builder, builder.gep(a_ptr, [ir.Constant(ir.IntType(64), 32 * g)]), I._V32I8)
        p = I._x86(builder, "llvm.x86.avx2.pmadd.ub.sw", I._V16I16, [I._V32I8, I._V32I8], [wg, a])
        s16 = p if s16 is None else builder.add(s16, p)
    ones = ir.Constant(I._V16I16, [1] * 16)
    return I._x86(builder, "llvm.x86.avx2.pmadd.wd", I._V8I32, [I._V16I16, I._V16I16], [s16, ones])


def _tile_dot_intrinsic(n_tiles):
    @intrinsic
    def tile_dot(typingctx, w, w_off, at, ad, ao, t_off, nb, out):
        sig = types.void(w, w_off, at, ad, ao, t_off, nb, out)

        def codegen(context, builder, signature, args):
            _tile_loop(context, builder, signature, args, n_tiles)

        return sig, codegen

    return tile_dot


_tile_dot1_avx2, _tile_dot2_avx2 = _tile_dot_intrinsic(1), _tile_dot_intrinsic(2)


@njit(cache=True, inline="always")
def _tile_dot_generic(w, w_off, at, ad, ao, t_off, nb, out, n_tiles):
    # the same sums as plain loops (CPUs without AVX2)
    at_flat, ad_flat, ao_flat = at.reshape(-1), ad.reshape(-1), ao.reshape(-1)
    for t in range(n_tiles):
        acc = np.zeros(TILE, np.float32)
        for b in range(nb):
            o, tb = w_off + b * I.Q4_0_BLOCK_BYTES, t_off + t * nb + b
            d_w = I._f16_bits_at(w, o)
            for j in range(TILE):
                total = np.int32(ao_flat[tb * TILE + j])
                for e in range(QK):
                    byte = np.int32(I._at(w, o + 2 + e % 16))
                    nibble = byte & 15 if e < 16 else byte >> 4
                    total += nibble * np.int32(at_flat[tb * TILE_BLOCK_BYTES + (e // 4) * 32 + 4 * j + e % 4])
                acc[j] += d_w * ad_flat[tb * TILE + j] * np.float32(total)
        out[TILE * t : TILE * (t + 1)] = acc


@njit(cache=True, inline="always")
def _tile_dot_avx2(w, w_off, at, ad, ao, t_off, nb, out, n_tiles):
    if n_tiles == 2:
        _tile_dot2_avx2(w, w_off, at, ad, ao, t_off, nb, out)
    else:
        _tile_dot1_avx2(w, w_off, at, ad, ao, t_off, nb, out)


# out[:8 n_tiles] = one Q4_0 row (byte w_off of w) times tiles t_off.. of (at, ad, ao), t_off counted in
# tile blocks of nb blocks each; chosen as intrinsics.py chooses its row products.
_tile_dot = _tile_dot_avx2 if I.SIMD == "avx2" else _tile_dot_generic


@njit(cache=True, inline="always")
def _row_tiles(out, n, w, w_off, r, at, ad, ao, acc, t0, t1):
    # out[8t + j, r] for tiles t0..t1-1 (tokens < n) = the row at byte w_off of w times the tiles
    nb = at.shape[1]
    for t in range(t0, t1, 2):
        k = min(2, t1 - t)
        _tile_dot(w, w_off, at, ad, ao, t * nb, nb, acc, k)
        for j in range(min(k * TILE, n - t * TILE)):
            out[t * TILE + j, r] = acc[j]


@njit(cache=True, inline="always")
def tiles_product(out, n, pool, slot, at, ad, ao, acc):
    """out float32 (>= n, rows)[:n] = tokens 0..n-1 of the tiles times Q4_0 rows pool[slot] (uint8
    (slots, rows, row_bytes)); acc float32 (2 * TILE,) scratch. Two tiles share each weight row read."""
    n_tiles = (n + TILE - 1) // TILE
    for r in range(pool.shape[1]):
        _row_tiles(out, n, pool, slot * pool.strides[0] + r * pool.strides[1], r, at, ad, ao, acc, 0, n_tiles)


@njit(cache=True, parallel=True)
def _quantize_all(x, at, ad, ao, scratch):
    # one tile of tokens per task; scratch (q, d, s) rows per thread
    T = x.shape[0]
    for t in prange(at.shape[0]):
        i = get_thread_id()
        n = min(TILE, T - t * TILE)
        q, d, s = scratch[0][i], scratch[1][i], scratch[2][i]
        quantize_tiles(x[t * TILE :], n, at[t : t + 1], ad[t : t + 1], ao[t : t + 1], q, d, s)


@njit(cache=True, parallel=True)
def _matmat(out, w, at, ad, ao, acc, chunk_rows, chunk_tiles):
    # tasks of chunk_rows rows by chunk_tiles tiles: the rows stay in L1 while the tiles stream by
    T, rows, n_tiles = out.shape[0], w.shape[0], at.shape[0]
    n_r, n_t = (rows + chunk_rows - 1) // chunk_rows, (n_tiles + chunk_tiles - 1) // chunk_tiles
    for task in prange(n_r * n_t):
        r0, t0 = (task % n_r) * chunk_rows, (task // n_r) * chunk_tiles
        a = acc[get_thread_id()]
        for r in range(r0, min(rows, r0 + chunk_rows)):
            _row_tiles(out, T, w, r * w.shape[1], r, at, ad, ao, a, t0, min(n_tiles, t0 + chunk_tiles))


# Task shape of matmat: 16 rows (18 KiB of a 2048-wide Q4_0 matrix) by 8 tiles (64 tokens, 128 KiB).
CHUNK_ROWS, CHUNK_TILES = 16, 8


def matmat(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """out float32 (T, rows) = x float32 (T, D) C-contiguous times Q4_0 rows w uint8 (rows, row_bytes)."""
    T, D = x.shape
    if D % QK or w.shape[1] != D // QK * I.Q4_0_BLOCK_BYTES or out.shape != (T, w.shape[0]) or not x.flags.c_contiguous:
        raise ValueError(f"token_tiles.matmat: x {x.shape}, w {w.shape}, out {out.shape} do not fit")
    at, ad, ao = quantize(x)
    _matmat(out, w, at, ad, ao, np.empty((numba.get_num_threads(), 2 * TILE), np.float32), CHUNK_ROWS, CHUNK_TILES)
    return out


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles (at, ad, ao) of x float32 (T, D) C-contiguous, D % 32 == 0 (layout in the module doc)."""
    T, D = x.shape
    n_tiles, nb, n_thr = (T + TILE - 1) // TILE, D // QK, numba.get_num_threads()
    at = np.empty((n_tiles, nb, GROUPS, 4 * TILE), np.int8)
    ad, ao = np.empty((n_tiles, nb, TILE), np.float32), np.empty((n_tiles, nb, TILE), np.int32)
    scratch = (np.empty((n_thr, D), np.int8), np.empty((n_thr, nb), np.float32), np.empty((n_thr, LANES * nb), np.int32))
    _quantize_all(x, at, ad, ao, scratch)
    return at, ad, ao
