"""K-quants (Q2_K..Q6_K) and their 32-block fallbacks (Q5_0, Q5_1).

quant/ (numpy) dequantizes bit for bit like gguf-py and quantizes to ggml's bytes (a committed
fixture of `quantize_row_*_ref` output; tests/test_kquants_ggml.py checks it against ggml live); the
numba quantizers write quant/'s bytes; the numba dequantizers are bit-identical to quant/ and the
products agree with float64 within float32 accumulation error.
"""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from r1cpu.kernels_numba import matmul
from r1cpu.kernels_numba.dispatch import embedding, linear
from r1cpu.kernels_numba.quantize import quantize_rows
from r1cpu.quant import registry
from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor

KQUANTS = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
TYPES = KQUANTS + [GGMLType.Q5_0, GGMLType.Q5_1]
# byte offsets of the f16 fields (d, dmin / m) in each block
F16_FIELDS = {
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
}  # fmt: skip
# zero, -0, smallest / largest subnormal, a negative subnormal, 1.0, -2.0, largest finite
SPECIAL_F16 = [0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x3C00, 0xC000, 0x7BFF]
FIXTURE = Path(__file__).parent / "fixtures" / "kquants" / "ggml_ref.npz"
ids = lambda t: t.name  # noqa: E731


def tricky_rows(n: int = 512, seed: int = 0) -> np.ndarray:
    """16 rows of n floats that reach the special paths of the searches (flat, all-zero, tiny, one-signed)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, n)).astype(np.float32)
    x[1] = 0  # every sub-block zero
    x[2] = np.abs(x[2])  # min clamps to 0
    x[3] = -np.abs(x[3])
    x[4] = 1.5  # flat positive: all the scale, no min
    x[5] = -2.0  # flat negative: max == min
    x[6, :48] = 0  # some zero sub-blocks in a live block
    x[7] *= 1e-3
    x[8] = rng.standard_t(2, n)  # heavy tails
    x[9] = rng.uniform(0, 1, n)
    x[10] = rng.integers(-4, 4, n)  # on the level grid: ties everywhere
    x[11] *= 1e-30  # below GROUP_MAX_EPS (1e-15)
    x[12, ::2] = 0
    x[13] = rng.standard_normal(n) ** 3
    x[14, 7] = 40.0  # one outlier
    x[15] = rng.standard_normal(n) * np.repeat(rng.uniform(0.01, 3, n // 16), 16)  # sub-block magnitudes vary
    return x.astype(np.float32)


def random_blocks(qtype, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes whose f16 fields are finite: random normals, plus SPECIAL_F16 in turn."""
    fmt = registry.get(qtype)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    for k, o in enumerate(F16_FIELDS[qtype]):
        h = rng.integers(0, 1 << 16, n_blocks).astype(np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # inf / NaN exponent -> a finite one
        h[k :: 3] = np.resize(np.array(SPECIAL_F16, np.uint16), len(h[k::3]))
        raw[:, o : o + 2] = h.view(np.uint8).reshape(-1, 2)
    return raw


def gguf_dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    return quants.dequantize(raw.reshape(-1), GGMLQuantizationType(int(qtype))).reshape(len(raw), -1)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_block_geometry_matches_ggml(qtype):
    fmt = registry.get(qtype)
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_dequantize_random_bytes_like_gguf(qtype):
    raw = random_blocks(qtype, 600)
    assert np.array_equal(bits(registry.dequantize(raw, qtype)), bits(gguf_dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_dequantize_our_quantizer_output_like_gguf(qtype):
    raw = registry.quantize(tricky_rows(), qtype)
    assert np.array_equal(bits(registry.dequantize(raw, qtype)), bits(gguf_dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_quantize_matches_ggml_fixture(qtype):
    ref = np.load(FIXTURE)
    assert np.array_equal(registry.quantize(ref["x"], qtype), ref[qtype.name])


@pytest.mark.parametrize("qtype", [GGMLType.Q5_0, GGMLType.Q5_1], ids=ids)
def test_q5_quantize_matches_gguf(qtype):
    x = tricky_rows(seed=1)
    want = quants.quantize(x, GGMLQuantizationType(int(qtype))).view(np.uint8).reshape(len(x), -1)
    assert np.array_equal(registry.quantize(x, qtype), want)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_numba_quantizer_writes_reference_bytes(qtype):
    x = np.vstack([tricky_rows(seed=2), tricky_rows(seed=3)])
    assert np.array_equal(quantize_rows(x, qtype), registry.quantize(x, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_numba_quantizer_reads_memmap(qtype, tmp_path):
    x = tricky_rows(256)
    x.tofile(tmp_path / "x.f32")
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=x.shape)
    assert np.array_equal(quantize_rows(mm, qtype), registry.quantize(x, qtype))


# relative RMSE on Gaussian rows: about 1.2x what the ggml reference search reaches
MAX_REL_RMSE = {
    GGMLType.Q2_K: 0.40, GGMLType.Q3_K: 0.21, GGMLType.Q4_K: 0.11, GGMLType.Q5_K: 0.055,
    GGMLType.Q6_K: 0.027, GGMLType.Q5_0: 0.06, GGMLType.Q5_1: 0.05,
}  # fmt: skip


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_quantization_error(qtype):
    x = np.random.default_rng(4).standard_normal((64, 512)).astype(np.float32)
    y = registry.dequantize(registry.quantize(x, qtype), qtype)
    assert np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x**2)) < MAX_REL_RMSE[qtype]


# ---- kernels_numba: dequantized rows, products ----------------------------------------------


def weight(qtype, shape, seed=0, raw=None, name="blk.0.w"):
    if raw is None:
        raw = registry.quantize(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), qtype)
    return Tensor.from_bytes(name, qtype, shape, raw.reshape(-1)), raw


# Types whose matvec multiplies x quantized to int8 blocks of this size (kernels_numba/kquant_int.py).
INT_MATVEC_BLOCK = {GGMLType.Q4_K: 256, GGMLType.Q6_K: 256, GGMLType.Q5_0: 32}


def int8_blocks(x: np.ndarray, n: int) -> np.ndarray:
    """x float32[..., D] as the integer kernels see it: per block of n, amax / 127 times round(x 127 / amax)."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, n)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return (np.rint(blocks * inv) * (amax / np.float32(127))).reshape(x.shape).astype(np.float64)


def matvec_input(qtype, x: np.ndarray) -> np.ndarray:
    return int8_blocks(x, INT_MATVEC_BLOCK[qtype]) if qtype in INT_MATVEC_BLOCK else x


def assert_close(y, ref, dense, x):
    """Within float32 accumulation error: 1e-5 of sum |w| |x| per output."""
    bound = 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(dense).T) + 1e-30
    assert y.dtype == np.float32 and y.shape == ref.shape and np.all(np.abs(y - ref) <= bound)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_dequantize_rows_bit_identical(qtype):
    raw = random_blocks(qtype, 7 * 4, seed=5).reshape(7, -1)
    n = 4 * registry.get(qtype).block_size
    w, _ = weight(qtype, (7, n), raw=raw)
    rows = np.array([6, 0, 3, 3])
    assert np.array_equal(bits(matmul.dequantize_rows(w, rows)), bits(registry.dequantize(raw[rows], qtype)))
    assert np.array_equal(bits(embedding(w, rows)), bits(registry.dequantize(raw[rows], qtype)))


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
@pytest.mark.parametrize("T", [None, 1, 9], ids=lambda t: "matvec" if t is None else f"T{t}")
def test_linear(qtype, T):
    w, raw = weight(qtype, (37, 512))
    dense = registry.dequantize(raw, qtype).astype(np.float64)
    x = np.random.default_rng(6).standard_normal((512,) if T is None else (T, 512)).astype(np.float32)
    # up to matmul._MATVEC_MAX_T rows run the matvec per row; larger batches decode the weights instead
    xm = matvec_input(qtype, x) if T is None or T <= matmul._MATVEC_MAX_T else x
    assert_close(linear(x, w), xm @ dense.T, dense, x)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_linear_on_read_only_memmap_of_special_scales(qtype, tmp_path):
    raw = random_blocks(qtype, 5 * 2, seed=7).reshape(5, -1)
    raw.tofile(tmp_path / "w.bin")
    mm = np.memmap(tmp_path / "w.bin", dtype=np.uint8, mode="r")
    w, _ = weight(qtype, (5, 2 * registry.get(qtype).block_size), raw=mm)
    dense = registry.dequantize(raw, qtype).astype(np.float64)
    x = np.random.default_rng(8).standard_normal((3, w.shape[1])).astype(np.float32)
    assert_close(linear(x[0], w), dense @ matvec_input(qtype, x[0]), dense, x[0])
    assert_close(linear(x, w), matvec_input(qtype, x) @ dense.T, dense, x)  # 3 rows: one matvec each
