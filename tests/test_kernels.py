"""kernels_numba matmul/dispatch against the numpy references in quant/ (bit-exact against gguf-py).

linear is checked against float64 products of the reference dequantization; dequantize_rows must be
bit-identical to it. Weights are built through Tensor.from_bytes, as the GGUF reader builds them.
Q8_0 products of few tokens and all Q4_0 products multiply x quantized to 8-bit blocks (as ggml
does): their reference uses that x, checked against its own reference in test_fast_kernels.py.
"""

import numba
import numpy as np
import pytest

from r1cpu.kernels_numba import matmul, threads
from r1cpu.kernels_numba.actquant import quantize
from r1cpu.kernels_numba.dispatch import embedding, linear
from r1cpu.quant import registry
from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor

TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0]
# Rows not a multiple of the 4-row group; D = 32 is a single block, D = 2048 a model-sized row.
SHAPES = [(1, 32), (6, 32), (37, 2048), (130, 96)]
# f16 scale bits: zero, negative zero, smallest and largest subnormal, a negative subnormal, normals.
SPECIAL_SCALES = [0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x0400, 0x2E66, 0xAE66, 0x7BFF]


def quantized(qtype, shape, seed=0, name="blk.0.w") -> tuple[Tensor, np.ndarray]:
    """A random weight stored as qtype, and its stored bytes."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    raw = registry.quantize(x, qtype)
    return Tensor.from_bytes(name, qtype, shape, raw.reshape(-1)), raw


def reference(raw, qtype) -> np.ndarray:
    return registry.dequantize(raw, qtype).astype(np.float64)


def activations(qtype, x) -> np.ndarray:
    """float64 x as the kernels multiply it: 8-bit blocks for Q8_0 up to QUANT_MAX_T tokens and for
    Q4_0 always (its batches take token_tiles.py)."""
    few = x.ndim == 1 or x.shape[0] <= matmul.QUANT_MAX_T
    if qtype == GGMLType.Q4_0 or (qtype == GGMLType.Q8_0 and few):
        x = quantize(x).dequantize().reshape(x.shape)
    return x.astype(np.float64)


def assert_close(y, ref, w_dense, x):
    """Within float32 accumulation error: 1e-5 of sum |w| |x| per output."""
    scale = np.abs(x.astype(np.float64)) @ np.abs(w_dense).T
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-30)


def block_bytes(qtype, n_rows, n_blocks, seed=0) -> np.ndarray:
    """Random Q8_0/Q4_0 rows whose block scales cycle through SPECIAL_SCALES."""
    fmt = registry.get(qtype)
    raw = np.random.default_rng(seed).integers(0, 256, (n_rows * n_blocks, fmt.type_size), dtype=np.uint8)
    scales = np.resize(np.array(SPECIAL_SCALES, np.uint16), n_rows * n_blocks)
    raw[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_rows, n_blocks * fmt.type_size)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("T", [None, 2, 7, 48], ids=lambda t: "matvec" if t is None else f"T{t}")
def test_linear_matches_reference(qtype, shape, T):
    w, raw = quantized(qtype, shape)
    dense = reference(raw, qtype)
    x_shape = (shape[1],) if T is None else (T, shape[1])
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    assert_close(linear(x, w), activations(qtype, x) @ dense.T, dense, x)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmat_over_many_tiles_into_out(qtype, monkeypatch):
    # 16-row tiles: 130 rows are 8 full tiles and a partial one.
    monkeypatch.setattr(matmul, "_TILE_FLOATS", 16 * 96)
    w, raw = quantized(qtype, (130, 96))
    dense = reference(raw, qtype)
    x = np.random.default_rng(2).standard_normal((matmul.QUANT_MAX_T + 3, 96)).astype(np.float32)
    out = np.full((x.shape[0], 130), np.nan, np.float32)
    assert linear(x, w, out=out) is out
    assert_close(out, activations(qtype, x) @ dense.T, dense, x)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_bit_exact(qtype):
    w, raw = quantized(qtype, (37, 96))
    rows = np.array([36, 0, 5, 5, 17])
    want = registry.dequantize(raw[rows], qtype)
    assert np.array_equal(matmul.dequantize_rows(w, rows).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_0], ids=lambda t: t.name)
def test_special_f16_scales(qtype):
    raw = block_bytes(qtype, 9, 4)
    w = Tensor.from_bytes("blk.0.special", qtype, (9, 128), raw.reshape(-1))
    dense = registry.dequantize(raw, qtype)
    assert np.array_equal(matmul.dequantize_tensor(w).view(np.uint32), dense.view(np.uint32))
    x = np.random.default_rng(3).standard_normal(128).astype(np.float32)
    dense64 = dense.astype(np.float64)
    assert_close(linear(x, w), dense64 @ activations(qtype, x), dense64, x)


def test_f16_every_bit_pattern():
    # All 65536 halves, NaN payloads and infinities included, against numpy's exact widening.
    bits = np.arange(1 << 16, dtype=np.uint16)
    w = Tensor("f16.all", GGMLType.F16, (256, 256), bits.view(np.float16).reshape(256, 256))
    got = matmul.dequantize_tensor(w).reshape(-1)
    assert np.array_equal(got.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_read_only_memmap(qtype, tmp_path):
    _, raw = quantized(qtype, (6, 64))
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    w = Tensor.from_bytes("blk.0.mapped", qtype, (6, 64), mm)
    assert not w.data.flags.writeable
    dense = reference(raw, qtype)
    x = np.random.default_rng(4).standard_normal((7, 64)).astype(np.float32)
    assert_close(linear(x[0], w), dense @ activations(qtype, x[0]), dense, x[0])
    assert_close(linear(x, w), activations(qtype, x) @ dense.T, dense, x)
    assert np.array_equal(embedding(w, [5, 0]), registry.dequantize(raw[[5, 0]], qtype))


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.BF16], ids=lambda t: t.name)
def test_stacked_experts_are_views(qtype):
    w, raw = quantized(qtype, (3, 10, 64), name="blk.3.ffn_up_exps")
    dense = reference(raw, qtype)
    x = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32)
    for e in range(3):
        assert np.shares_memory(w[e].data, w.data)
        assert_close(linear(x[e], w[e]), dense[e] @ activations(qtype, x[e]), dense[e], x[e])
        assert_close(linear(x, w[e]), activations(qtype, x) @ dense[e].T, dense[e], x)
    assert np.array_equal(matmul.dequantize_tensor(w), dense.astype(np.float32))


def test_embedding_rows():
    w, raw = quantized(GGMLType.Q4_0, (50, 64), name="token_embd.weight")
    ids = np.array([3, 49, 3, 0], np.int32)
    assert np.array_equal(embedding(w, ids), registry.dequantize(raw[ids], GGMLType.Q4_0))
    assert embedding(w, np.array([], np.int64)).shape == (0, 64)


@pytest.mark.parametrize(
    "ids", [[50], [-1], [[1, 2]], [1.0]], ids=["past_end", "negative", "2d", "float"]
)
def test_embedding_rejects_bad_ids(ids):
    w, _ = quantized(GGMLType.Q8_0, (50, 64), name="token_embd.weight")
    with pytest.raises(ValueError, match="token_embd.weight"):
        embedding(w, np.array(ids))


def bad_linear_calls():
    """(weight, x, out) calls that must raise a ValueError naming the weight."""
    w, _ = quantized(GGMLType.Q8_0, (8, 64), name="blk.1.attn_q.weight")
    x = np.zeros(64, np.float32)
    x2 = np.zeros((5, 64), np.float32)
    # an integer tensor type: never a linear weight, whatever formats get kernels later
    ints = Tensor("blk.1.ints.weight", GGMLType.I32, (8, 64), np.zeros((8, 64), np.int32))
    short = Tensor("blk.1.short.weight", GGMLType.Q8_0, (8, 64), np.zeros((8, 34), np.uint8))
    odd = Tensor("blk.1.odd.weight", GGMLType.Q8_0, (8, 48), np.zeros((8, 51), np.uint8))
    stack, _ = quantized(GGMLType.Q8_0, (2, 8, 64), name="blk.1.ffn_up_exps.weight")
    return [
        pytest.param(w, np.zeros(32, np.float32), None, id="features"),
        pytest.param(w, np.zeros((5, 32), np.float32), None, id="features_2d"),
        pytest.param(w, np.zeros(64), None, id="float64_x"),
        pytest.param(w, np.zeros((5, 128), np.float32)[:, ::2], None, id="strided_x"),
        pytest.param(w, np.zeros((2, 5, 64), np.float32), None, id="3d_x"),
        pytest.param(w, x2, np.zeros((5, 9), np.float32), id="out_shape"),
        pytest.param(w, x, np.zeros(8, np.float64), id="out_dtype"),
        pytest.param(ints, x, None, id="unsupported"),
        pytest.param(short, x, None, id="data_layout"),
        pytest.param(odd, np.zeros(48, np.float32), None, id="partial_block"),
        pytest.param(stack, x, None, id="unindexed_stack"),
    ]


@pytest.mark.parametrize("w,x,out", bad_linear_calls())
def test_linear_errors_name_the_tensor(w, x, out):
    with pytest.raises(ValueError, match=w.name.replace(".", r"\.")):
        linear(x, w, out)


@pytest.fixture
def restore_threads():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


def test_set_threads(restore_threads):
    assert threads.set_threads(1) == 1 and numba.get_num_threads() == 1
    n = threads.set_threads()
    assert 1 <= n <= numba.config.NUMBA_NUM_THREADS and numba.get_num_threads() == n
    with pytest.raises(ValueError):
        threads.set_threads(0)
