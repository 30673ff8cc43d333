"""Integer k-quant products (kernels_numba/kquant_int.py): the 256-block activation quantizer against
its formula, the AVX2 super-block sums against the portable loops (the same integers), and Q5_0's row
dots likewise. tests/test_kquants.py checks the products through linear() against gguf-py's
dequantized weights times these quantized activations."""

import numpy as np
import pytest
from numba import njit

from r1cpu.kernels_numba import actquant, intrinsics, kquant_int
from r1cpu.quant.registry import GGMLType
from test_kquants import random_blocks


def test_q8k_quantization_matches_formula():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(768) * 3).astype(np.float32)
    x[256:512] = 0  # an all-zero block: scale 0, every q 0
    x[600] = 1e4  # one value dominates its block
    q, dx, bs = kquant_int.quantize_q8k(x)
    blocks = x.reshape(3, 256)
    amax = np.abs(blocks).max(-1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    want = np.rint(blocks * inv[:, None]).astype(np.int32)
    assert np.array_equal(q.reshape(3, 256), want) and np.abs(q).max() <= 127
    assert np.array_equal(dx, (amax / np.float32(127)).astype(np.float32))
    assert np.array_equal(bs, want.reshape(-1, 16).sum(-1))


@njit(cache=True)
def _both_sums(kind, w, xq, bs, bytes_per_block):
    # (row, super-block, [avx2, portable] x [weights . xq, the mins or offset term]); kind 4: Q4_K, 6: Q6_K
    n = w.shape[1] // bytes_per_block
    out = np.empty((w.shape[0], n, 4), np.int64)
    for r in range(w.shape[0]):
        for s in range(n):
            o = r * w.shape[1] + s * bytes_per_block
            if kind == 4:
                sc, m = kquant_int._scales_mins_q4_k(w, o + 4)
                out[r, s, 0] = kquant_int._isum_q4_k_avx2(w, o, xq, 256 * s, sc)
                out[r, s, 1] = kquant_int._isum_q4_k_generic(w, o, xq, 256 * s, sc)
                out[r, s, 2] = kquant_int._mins_dot_q4_k_avx2(bs, 16 * s, m)
                out[r, s, 3] = kquant_int._mins_dot_q4_k_generic(bs, 16 * s, m)
            else:
                out[r, s, 0] = kquant_int._isum_q6_k_avx2(w, o, xq, 256 * s)
                out[r, s, 1] = kquant_int._isum_q6_k_generic(w, o, xq, 256 * s)
                out[r, s, 2] = kquant_int._offset_q6_k_avx2(w, o, bs, 16 * s)
                out[r, s, 3] = kquant_int._offset_q6_k_generic(w, o, bs, 16 * s)
    return out


@pytest.mark.skipif(intrinsics.SIMD != "avx2", reason="needs AVX2")
@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_simd_super_block_sums_equal_portable(qtype):
    size = {GGMLType.Q4_K: kquant_int.Q4_K_BYTES, GGMLType.Q6_K: kquant_int.Q6_K_BYTES}[qtype]
    w = random_blocks(qtype, 6 * 3, seed=3).reshape(6, 3 * size)  # every byte value, scales included
    xq = np.random.default_rng(4).integers(-127, 128, 3 * 256).astype(np.int8)
    xq[:32] = 127  # the largest pair sums
    bs = xq.reshape(-1, 16).sum(-1).astype(np.int16)
    bs[0] = -16 * 127  # the extreme block sums
    sums = _both_sums(4 if qtype == GGMLType.Q4_K else 6, w, xq, bs, size)
    assert np.array_equal(sums[..., 0], sums[..., 1]) and np.array_equal(sums[..., 2], sums[..., 3])


@njit(cache=True)
def _q5_0_dots(w, xq, xd, xs):
    out = np.empty((w.shape[0], 2), np.float32)
    nb = xd.size
    for r in range(w.shape[0]):
        out[r, 0] = intrinsics._dot_q5_0_avx2(w, r * w.shape[1], xq, 0, xd, 0, nb, xs)
        out[r, 1] = intrinsics._dot_q5_0_generic(w, r * w.shape[1], xq, 0, xd, 0, nb, xs)
    return out


@pytest.mark.skipif(intrinsics.SIMD != "avx2", reason="needs AVX2")
def test_q5_0_simd_row_dot_equals_portable():
    w = random_blocks(GGMLType.Q5_0, 9 * 4, seed=5).reshape(9, -1)
    x = np.random.default_rng(6).standard_normal(128).astype(np.float32)
    act = actquant.quantize(x)
    dots = _q5_0_dots(w, act.q[0], act.d[0], act.s[0])
    scale = np.abs(dots).max() + 1e-30
    assert np.all(np.abs(dots[:, 0] - dots[:, 1]) <= 1e-6 * scale)  # same integers, other summation order
