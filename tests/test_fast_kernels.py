"""The decode kernels on 8-bit activations against numpy references built from quant/.

actquant against a direct numpy transcription of its formula; the SIMD row dots against the portable
ones and float64 products; the fused MoE and the MLA decode kernel against the numpy maths they fuse.
A subprocess compiles for a CPU without AVX2 (NUMBA_CPU_NAME=generic) to check the fallback is the
one taken there and gives the same answers.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from r1cpu.kernels_numba import actquant, fused_moe, intrinsics, matmul, mla_decode
from r1cpu.kernels_numba.fused_moe import FusedMoE
from r1cpu.kernels_numba.intrinsics import KIND_F32, KIND_Q4_0, KIND_Q8_0
from r1cpu.quant import registry
from r1cpu.quant.registry import GGMLType
from test_kquants import int8_blocks

INT_TYPES = {GGMLType.Q8_0: KIND_Q8_0, GGMLType.Q4_0: KIND_Q4_0}


def stored(shape, qtype, seed=0, scale=1.0):
    """(bytes (*shape[:-1], row_bytes), float64 dequantized) of random weights stored as qtype."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(scale)
    raw = registry.quantize(x.reshape(-1, shape[-1]), qtype)
    dense = registry.dequantize(raw, qtype).reshape(shape).astype(np.float64)
    return raw.reshape(*shape[:-1], -1), dense


def q8(x) -> np.ndarray:
    """float64 of what the integer kernels multiply for x float32 [..., D]."""
    return actquant.quantize(np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])).dequantize().reshape(x.shape).astype(np.float64)


def test_activation_quantization_matches_formula():
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32) * 5
    x[1, :32] = 0  # an all-zero block: scale 0, every q 0
    x[2, 40] = 1e4  # one large value dominates its block
    act = actquant.quantize(x)
    blocks = x.reshape(3, 3, 32)
    d = np.abs(blocks).max(-1) / np.float32(127)
    inv = np.divide(np.float32(127), np.abs(blocks).max(-1), out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv[..., None]).astype(np.int32)
    assert np.array_equal(act.q.reshape(3, 3, 32), q)
    assert np.array_equal(act.d, d.astype(np.float32))
    assert np.array_equal(act.s, -8 * q.reshape(3, 3, 8, 4).sum(-1).reshape(3, 24))  # Q4_0's offset lanes
    assert np.abs(act.q).max() <= 127
    # relative error of the round trip: half a step of 1/127 of the block maximum
    assert np.all(np.abs(act.dequantize() - x).reshape(3, 3, 32) <= d[..., None] * 0.5001 + 1e-30)


def test_activation_buffers_are_reused():
    act = actquant.ActQ8()
    act.quantize(np.ones((4, 64), np.float32))
    q = act.q
    act.quantize(np.ones(64, np.float32))
    assert np.shares_memory(q, act.q) and act.q.shape == (1, 64)
    with pytest.raises(ValueError, match="D % 32"):
        act.quantize(np.ones(48, np.float32))


@njit(cache=True)
def _row_dots(simd, kind, w, xq, xd, xs):
    out = np.empty(w.shape[0], np.float32)
    nb = xd.shape[1]
    for r in range(w.shape[0]):
        if simd:
            out[r] = intrinsics.dot_row(kind, w, r * w.shape[1], xq, 0, xd, xs, 0, nb)
        elif kind == KIND_Q8_0:
            out[r] = intrinsics._dot_q8_0_generic(w, r * w.shape[1], xq, 0, xd, 0, nb)
        else:
            out[r] = intrinsics._dot_q4_0_generic(w, r * w.shape[1], xq, 0, xd, 0, nb, xs)
    return out


@pytest.mark.parametrize("qtype", list(INT_TYPES), ids=lambda t: t.name)
def test_row_dot_simd_equals_portable(qtype):
    raw, dense = stored((19, 320), qtype)
    x = np.random.default_rng(1).standard_normal((1, 320)).astype(np.float32)
    act = actquant.quantize(x)
    want = dense @ q8(x)[0]
    fast = _row_dots(True, INT_TYPES[qtype], raw, act.q, act.d, act.s)
    slow = _row_dots(False, INT_TYPES[qtype], raw, act.q, act.d, act.s)
    bound = 1e-5 * (np.abs(dense) @ np.abs(x[0]))
    assert np.all(np.abs(fast - want) <= bound) and np.all(np.abs(slow - want) <= bound)


def test_simd_choice_follows_numba_target():
    assert intrinsics.SIMD in ("avx2", "generic")
    assert (intrinsics.SIMD == "avx2") == ({"avx2", "f16c", "fma"} <= intrinsics.FEATURES)


def _swiglu(g, u, d, x):
    a, b = g @ x, u @ x
    return d @ q8((a / (1 + np.exp(-a)) * b).astype(np.float32))


@pytest.mark.parametrize("qtype", list(INT_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("n_shared", [0, 64])
def test_fused_moe_matches_expert_sum(qtype, n_shared):
    E, F, D, K = 6, 96, 128, 3
    (g, gd), (u, ud), (d, dd) = stored((E, F, D), qtype, 1), stored((E, F, D), qtype, 2), stored((E, D, F), qtype, 3)
    (sg, sgd), (su, sud), (sd, sdd) = stored((1, 64, D), qtype, 4), stored((1, 64, D), qtype, 5), stored((1, D, 64), qtype, 6)
    if not n_shared:  # no shared experts: zero-row pools
        sg, su, sd = sg[:, :0], su[:, :0], np.zeros((1, D, 0), np.uint8)
    x = np.random.default_rng(9).standard_normal(D).astype(np.float32)
    slots, weights = np.array([4, 0, 2]), np.array([0.5, 0.3, 0.2], np.float32)
    kind = INT_TYPES[qtype]
    moe = FusedMoE(K, F, n_shared, D)
    y = moe(actquant.quantize(x), np.array([kind] * 4), (g, u, d), (sg, su, sd), slots, weights)
    xq = q8(x)
    want = sum(w * _swiglu(gd[s], ud[s], dd[s], xq) for s, w in zip(slots, weights))
    if n_shared:
        want = want + _swiglu(sgd[0], sud[0], sdd[0], xq)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * np.abs(want).max())


def _mla_reference(kb, vb, q_nope, q_pe, kv, scale, quant_q, quant_o):
    C = kb.shape[1]
    q = np.concatenate([np.einsum("hcn,hn->hc", kb, q8(q_nope) if quant_q else q_nope), q_pe], -1)
    s = scale * q @ kv.T.astype(np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    o_lat = (p / p.sum(-1, keepdims=True)) @ kv[:, :C]
    return np.einsum("hvc,hc->hv", vb, q8(o_lat) if quant_o else o_lat)


@pytest.mark.parametrize(
    "k_type,v_type", [(GGMLType.F32, GGMLType.F32), (GGMLType.Q8_0, GGMLType.Q8_0), (GGMLType.Q4_0, GGMLType.Q8_0), (GGMLType.F32, GGMLType.Q4_0)]
)
@pytest.mark.parametrize("threads", [1, 3])
def test_mla_decode_matches_numpy(k_type, v_type, threads):
    H, C, R, N, V, L = 5, 64, 32, 64, 32, 37
    rng = np.random.default_rng(0)

    def weight(shape, qtype, seed):
        if qtype == GGMLType.F32:
            w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
            return w, w.astype(np.float64)
        return stored(shape, qtype, seed, 0.1)

    (kb, kbd), (vb, vbd) = weight((H, C, N), k_type, 1), weight((H, V, C), v_type, 2)
    q_nope, q_pe = rng.standard_normal((H, N)).astype(np.float32), rng.standard_normal((H, R)).astype(np.float32)
    kv = rng.standard_normal((L, C + R)).astype(np.float32)
    kinds = np.array([mla_decode.absorb_weight(k_type, kb)[0], mla_decode.absorb_weight(v_type, vb)[0]])
    o = mla_decode.MLADecode(H, C, R, N, V)(kinds, kb, vb, q_nope, q_pe, kv, 0.1, threads)
    want = _mla_reference(kbd, vbd, q_nope, q_pe, kv, 0.1, kinds[0] != KIND_F32, kinds[1] != KIND_F32)
    np.testing.assert_allclose(o, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_mla_decode_other_types_take_the_old_path():
    assert mla_decode.absorb_weight(GGMLType.F16, np.zeros((2, 4, 32), np.float16)) is None


# (type, columns) of the portable-fallback test: the 8-bit-activation kernels of matmul and kquant_int
GENERIC_TYPES = [(GGMLType.Q8_0, 96), (GGMLType.Q4_0, 96), (GGMLType.Q5_0, 96), (GGMLType.Q4_K, 512), (GGMLType.Q6_K, 512)]


def test_portable_fallback_in_generic_build(tmp_path):
    # A CPU without AVX2: numba compiles for "generic" (its cache keys on that too), and the kernels
    # must pick the portable loops and give the same products.
    code = (
        "import numpy as np\n"
        "from r1cpu.kernels_numba import dispatch, intrinsics\n"
        "from r1cpu.quant import registry\n"
        "from r1cpu.quant.registry import GGMLType\n"
        "from r1cpu.quant.tensor import Tensor\n"
        "assert intrinsics.SIMD == 'generic', intrinsics.SIMD\n"
        f"for t, n in {[(int(t), n) for t, n in GENERIC_TYPES]}:\n"
        "    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)\n"
        "    w = np.random.default_rng(0).standard_normal((5, n)).astype(np.float32)\n"
        "    raw = registry.quantize(w, GGMLType(t))\n"
        "    y = dispatch.linear(x, Tensor.from_bytes('w', GGMLType(t), (5, n), raw.reshape(-1)))\n"
        "    print(' '.join(repr(float(v)) for v in y))\n"
        "from r1cpu.kernels_numba import actquant, qlinear, token_tiles\n"  # Q4_0 batches: token tiles
        "w = registry.quantize(np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32), GGMLType.Q4_0)\n"
        "x = np.random.default_rng(3).standard_normal((19, 64)).astype(np.float32)\n"
        "rows = qlinear.matvec(np.empty((19, 6), np.float32), w, intrinsics.KIND_Q4_0, actquant.quantize(x))\n"
        "tiles = token_tiles.matmat(np.empty((19, 6), np.float32), w, x)\n"
        "assert np.allclose(tiles, rows, rtol=0, atol=1e-5 * np.abs(rows).max()), (tiles, rows)\n"
    )
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line, (qtype, n) in zip(proc.stdout.splitlines(), GENERIC_TYPES, strict=True):
        x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
        w = np.random.default_rng(0).standard_normal((5, n)).astype(np.float32)
        dense = registry.dequantize(registry.quantize(w, qtype), qtype).astype(np.float64)
        got = np.array([float(v) for v in line.split()])
        want = dense @ int8_blocks(x, 256 if n == 512 else 32)  # the activations the kernels multiply
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(dense).sum(1).max())


def test_matmat_tiles_cover_every_row(monkeypatch):
    # tiles of 16 rows over 3 threads' scratch: 70 rows end in a partial tile
    monkeypatch.setattr(matmul, "_TILE_FLOATS", 16 * 64)
    from r1cpu.quant.tensor import Tensor

    raw, dense = stored((70, 64), GGMLType.Q8_0)  # Q8_0 batches decode rows for sgemm (Q4_0's take token tiles)
    w = Tensor.from_bytes("blk.0.tiles", GGMLType.Q8_0, (70, 64), raw.reshape(-1))
    x = np.random.default_rng(3).standard_normal((matmul.QUANT_MAX_T + 5, 64)).astype(np.float32)
    y = matmul.matmat(w, x)
    np.testing.assert_allclose(y, x.astype(np.float64) @ dense.T, rtol=0, atol=1e-5 * np.abs(dense).sum(1).max() * 4)


@pytest.mark.parametrize("T, first", [(1, 0), (6, 0), (5, 37)])
def test_prefill_attention_without_cblas_matches(T, first, monkeypatch):
    from r1cpu.kernels_numba import attention, threads

    rng = np.random.default_rng(7)
    q = rng.standard_normal((T, 4, 48)).astype(np.float32)
    kv = rng.standard_normal((first + T, 48)).astype(np.float32)
    fast = attention.mla_attend(q, kv, 40, 0.3, first)
    monkeypatch.setattr(threads, "sgemm", lambda: None)
    np.testing.assert_allclose(attention.mla_attend(q, kv, 40, 0.3, first), fast, rtol=1e-5, atol=1e-6)


def test_matmat_without_cblas_matches(monkeypatch):
    from r1cpu.kernels_numba import threads
    from r1cpu.quant.tensor import Tensor

    raw, dense = stored((40, 64), GGMLType.Q8_0)
    w = Tensor.from_bytes("blk.0.portable", GGMLType.Q8_0, (40, 64), raw.reshape(-1))
    x = np.random.default_rng(3).standard_normal((matmul.QUANT_MAX_T + 2, 64)).astype(np.float32)
    fast = matmul.matmat(w, x)
    monkeypatch.setattr(threads, "sgemm", lambda: None)
    np.testing.assert_allclose(matmul.matmat(w, x), fast, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("qtype", "q_max"),
    [(GGMLType.Q8_0, 0), (GGMLType.Q8_0, 100), (GGMLType.Q4_0, 0), (GGMLType.Q4_0, 100), (GGMLType.Q4_K, 0), (GGMLType.Q6_K, 0)],
    ids=["Q8_0-sgemm", "Q8_0-8-bit", "Q4_0-tiles", "Q4_0-8-bit", "Q4_K-sgemm", "Q6_K-sgemm"],
)  # fmt: skip
@pytest.mark.parametrize("T", [9, 70])  # 70: experts with several tiles of 8 tokens (Q4_0)
def test_moe_batch_matches_expert_sum(qtype, q_max, T):
    # prefill: each expert's tokens through decoded weights and sgemm, or 8-bit products (few tokens,
    # and every Q4_0 batch: token tiles past q_max)
    from r1cpu.kernels_numba.fused_moe import moe_batch

    E, K = 6, 2
    F, D = (256, 256) if qtype in (GGMLType.Q4_K, GGMLType.Q6_K) else (64, 96)  # whole blocks per row
    (g, gd), (u, ud), (d, dd) = stored((E, F, D), qtype, 1), stored((E, F, D), qtype, 2), stored((E, D, F), qtype, 3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((T, D)).astype(np.float32)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    w = rng.random((T, K)).astype(np.float32)
    turn = np.unique(idx)[1:]  # a turn of some of the used experts; slots = 5 - expert (a shuffled pool)
    kind = matmul.CODECS[qtype].kind
    y = moe_batch(x, (np.array([kind] * 2), q_max), (g[::-1].copy(), u[::-1].copy(), d[::-1].copy()), 5 - turn, idx, w, turn)
    act = q8 if q_max or qtype == GGMLType.Q4_0 else (lambda v: np.asarray(v, np.float64))
    want = np.zeros((T, D))
    for t, k in zip(*np.nonzero(np.isin(idx, turn))):
        e = idx[t, k]
        a, b = gd[e] @ act(x[t]), ud[e] @ act(x[t])
        want[t] += w[t, k] * (dd[e] @ act((a / (1 + np.exp(-a)) * b).astype(np.float32)))
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_moe_batch_plan():
    from r1cpu.quant.tensor import Tensor

    def t(qtype, shape):
        return Tensor("w", qtype, shape, np.zeros(1, np.uint8))

    q8_0 = [t(GGMLType.Q8_0, (4, 64, 96))] * 2 + [t(GGMLType.Q8_0, (4, 96, 64))]
    kinds, q_max = fused_moe.batch_plan(*q8_0)
    assert list(kinds) == [KIND_Q8_0, KIND_Q8_0] and q_max == matmul.QUANT_MAX_T
    mixed = [t(GGMLType.Q4_K, (4, 256, 256))] * 2 + [t(GGMLType.Q5_0, (4, 256, 256))]
    kinds, q_max = fused_moe.batch_plan(*mixed)  # a q4_k_m layer: decoded, never 8-bit products
    assert list(kinds) == [matmul.CODECS[GGMLType.Q4_K].kind, matmul.CODECS[GGMLType.Q5_0].kind] and q_max == 0
    assert fused_moe.batch_plan(*[t(GGMLType.F32, (4, 64, 96))] * 3) is None  # no row decoder: per-expert path
    # decoding whole experts pays only with several tokens each; 8-bit products serve any count
    n = fused_moe.DECODE_MIN_TOKENS
    assert not fused_moe.batch_pays((kinds, 0), 6, 6) and fused_moe.batch_pays((kinds, 0), 6 * n, 6)
    assert fused_moe.batch_pays((kinds, matmul.QUANT_MAX_T), 6, 6)
