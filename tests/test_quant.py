"""quant/ (numpy reference) against gguf-py bit for bit, and kernels_numba/quantize against quant/."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from r1cpu.kernels_numba.quantize import FAST_QUANTIZERS, quantize_rows, quantize_rows_into
from r1cpu.quant import registry
from r1cpu.quant.registry import GGMLType

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0"]


def gguf_quantize(x, name):
    # gguf-py returns float arrays for F32/F16 and bytes for the block types
    with np.errstate(all="ignore"):
        q = np.ascontiguousarray(quants.quantize(x, GGMLQuantizationType[name]))
    return q.view(np.uint8).reshape(x.shape[0], -1)


def gguf_dequantize(b, name):
    with np.errstate(all="ignore"):
        return np.asarray(quants.dequantize(b, GGMLQuantizationType[name]), dtype=np.float32)


def tie_block(top, lo):
    # top fixes the scale to exactly 1.0 (Q8_0: amax 127; Q4_0: max -8, and a later +8 must not win);
    # the rest sit on .5 steps
    b = np.arange(32, dtype=np.float32) / 2 + np.float32(lo)
    b[0] = top
    return b


def f32_from_bits(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def near_ties(n, rng):
    """Two rows that sit within float32 rounding of the Q8_0 .5 ties and the Q4_0 truncation steps.

    x = (k + 1/2) * d is rounded to float32, so whether x / d lands above or below the step depends on
    the precision of the division: a kernel that computes in float64 instead of float32 fails here.
    """
    amax = rng.uniform(0.5, 2.0, (n // 32, 1)).astype(np.float32)  # block[0]: fixes the scale
    d8, d4 = amax / np.float32(127), amax / np.float32(8)
    q8 = (rng.integers(-127, 127, (n // 32, 31)) + 0.5) * d8.astype(np.float64)
    q4 = (rng.integers(1, 17, (n // 32, 31)) - 8.5) * d4.astype(np.float64)
    return np.hstack([amax, q8]).ravel(), np.hstack([-amax, q4]).ravel()


def ref_quantize(x, name):
    with np.errstate(over="ignore"):  # fp16 overflow to inf is part of the test data
        return registry.quantize(x, name)


def make_rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    """n_rows >= 8 rows of n float32: zeros, ties, large, tiny, mixed, fp16/bf16 ties, near ties, random."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n)).astype(np.float32)
    # zeros; gguf-py's Q4_0 takes max = x[argmax |x|], so the leading -0.0 stores d = +0.0, others -0.0
    x[0] = 0
    x[0, 0] = -0.0
    x[1] = np.tile(np.concatenate([tie_block(127, -8), tie_block(-8, -7.5)]), n // 64 + 1)[:n]
    x[2] *= np.float32(1e4)  # large: fp16 scales stay finite, some fp16 values overflow
    x[3] *= np.float32(1e-30)  # tiny: the fp16 scale rounds to 0, 1/d stays finite
    x[4] *= (10.0 ** rng.uniform(-8, 4, n)).astype(np.float32)  # mixed magnitudes in one block
    # fp16 ties: 1 + 2^-11 rounds down to 1, 1 + 3*2^-11 up; bf16 ties: low half exactly 0x8000
    x[5, :4] = [1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 65520.0]
    x[5, 4:8] = f32_from_bits([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF])
    x[6], x[7] = near_ties(n, rng)
    return x


SHAPES = [(10, 32), (10, 256), (16, 4096)]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_and_numba_bytes_match_gguf(name, shape):
    x = make_rows(*shape, seed=shape[1])
    ref = ref_quantize(x, name)
    assert np.array_equal(ref, gguf_quantize(x, name))
    assert np.array_equal(quantize_rows(x, name), ref)


@pytest.mark.parametrize("name", TYPES)
def test_reference_dequantize_matches_gguf_bits(name):
    x = make_rows(8, 256, seed=1)
    data = gguf_quantize(x, name)
    ref = registry.dequantize(data, name)
    assert ref.dtype == np.float32 and ref.shape == x.shape
    assert np.array_equal(ref.view(np.uint32), gguf_dequantize(data, name).reshape(x.shape).view(np.uint32))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_fp16_scale_overflow_matches_gguf(name):
    # |x| ~ 1e30 gives d beyond fp16 range: the stored scale is inf in every implementation
    x = make_rows(8, 64, seed=2) * np.float32(1e30)
    with np.errstate(all="ignore"):
        ref = registry.quantize(x, name)
    assert np.array_equal(ref, gguf_quantize(x, name))
    assert np.array_equal(quantize_rows(x, name), ref)
    assert ref[1, 1] & 0x7F == 0x7C  # high byte of the first scale of row 1: +-inf (0x7C00 / 0xFC00)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_float_casts_match_gguf_on_random_bit_patterns(name):
    # every exponent appears: float32 subnormals, fp16 subnormals, overflow to inf, +-inf
    bits = np.random.default_rng(3).integers(0, 2**32, (64, 1024), dtype=np.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    if name == "F16":  # numpy's cast of NaN payloads is platform-dependent: keep only a quiet NaN
        bits[is_nan] = 0x7FC00000
    x = bits.view(np.float32)
    ref = ref_quantize(x, name)
    assert np.array_equal(ref, gguf_quantize(x, name))
    assert np.array_equal(quantize_rows(x, name), ref)


def test_q8_0_hand_block():
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [127, -63.5, 0.5, -0.5, 1.49, -127]  # amax 127 -> d = 1.0, ties go away from zero
    q = [127, -64, 1, -1, 1, -127] + [0] * 26
    expected = np.array([0x00, 0x3C] + [v & 0xFF for v in q], np.uint8)  # fp16 1.0 is 0x3C00
    assert np.array_equal(registry.quantize(x, "Q8_0")[0], expected)
    assert np.array_equal(quantize_rows(x, "Q8_0")[0], expected)
    assert np.array_equal(registry.dequantize(expected, "Q8_0"), np.array(q, np.float32))


def test_q4_0_hand_block():
    x = np.zeros((1, 32), np.float32)
    x[0, [0, 5, 16, 17, 20]] = [-8, 8, -7.5, 0.5, 7.4]  # -8 comes first of the |8|s: d = -8 / -8 = 1
    q = np.full(32, 8)
    q[[0, 5, 16, 17, 20]] = [0, 15, 1, 9, 15]  # min(15, trunc(x + 8.5)): 8 clips at 15
    qs = [0x10, 0x98, 0x88, 0x88, 0xF8, 0x8F] + [0x88] * 10  # byte j: q[j] | q[j + 16] << 4
    expected = np.array([0x00, 0x3C] + qs, np.uint8)
    assert np.array_equal(registry.quantize(x, "Q4_0")[0], expected)
    assert np.array_equal(quantize_rows(x, "Q4_0")[0], expected)
    assert np.array_equal(registry.dequantize(expected, "Q4_0"), (q - 8).astype(np.float32))


@pytest.mark.parametrize("name", TYPES)
def test_sizes_match_gguf(name):
    fmt = registry.get(name)
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]


@pytest.mark.parametrize("name", TYPES)
def test_numba_accepts_read_only_memmap(tmp_path, name):
    x = make_rows(8, 64, seed=4)
    x.tofile(tmp_path / "x.f32")
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=x.shape)
    assert not mm.flags.writeable
    assert np.array_equal(quantize_rows(mm, name), ref_quantize(x, name))


def test_fast_registry_covers_the_builtin_formats():
    assert set(FAST_QUANTIZERS) == set(registry.supported())


@pytest.mark.parametrize(
    "x, qtype, out",
    [
        (np.zeros((2, 32), np.float64), "Q8_0", np.zeros((2, 34), np.uint8)),  # wrong dtype
        (np.zeros((2, 64), np.float32)[:, ::2], "Q8_0", np.zeros((2, 34), np.uint8)),  # strided
        (np.zeros((2, 32), np.float32), "Q8_0", np.zeros((2, 18), np.uint8)),  # wrong out shape
        (np.zeros((2, 32), np.float32), "Q4_1", np.zeros((2, 20), np.uint8)),  # no fast kernel
        (np.zeros((2, 33), np.float32), "Q4_0", np.zeros((2, 18), np.uint8)),  # partial block
    ],
)
def test_wrapper_rejects_bad_input(x, qtype, out):
    with pytest.raises(ValueError):
        quantize_rows_into(x, qtype, out)
