"""FP8 (e4m3fn + 128x128 scale_inv): the decode table, the reference dequant and its numba twin."""

import struct

import numpy as np
import pytest

from r1cpu.kernels_numba.quantize import dequantize_fp8_rows
from r1cpu.quant.fp8 import E4M3_TABLE, dequantize_fp8


def hand_e4m3(code: int) -> float:
    """Decode one code by building the float32 bit pattern (normals) or by m * 2^-9 (subnormals)."""
    s, e, m = code >> 7, (code >> 3) & 0xF, code & 0x7
    if e == 15 and m == 7:
        return float("nan")
    if e == 0:
        return (-1.0) ** s * m * 2.0**-9
    # rebias the exponent 7 -> 127 and move the 3 mantissa bits to the top of float32's 23
    return struct.unpack("<f", struct.pack("<I", s << 31 | (e - 7 + 127) << 23 | m << 20))[0]


HAND = np.array([hand_e4m3(c) for c in range(256)], np.float32)


def test_table_all_codes_by_hand():
    assert E4M3_TABLE.dtype == np.float32 and E4M3_TABLE.shape == (256,)
    nan = np.isnan(HAND)
    assert np.flatnonzero(nan).tolist() == [0x7F, 0xFF]
    assert np.array_equal(np.isnan(E4M3_TABLE), nan)
    assert np.array_equal(E4M3_TABLE[~nan].view(np.uint32), HAND[~nan].view(np.uint32))  # -0.0 too
    known = {0x00: 0.0, 0x01: 2.0**-9, 0x07: 7 * 2.0**-9, 0x08: 2.0**-6, 0x38: 1.0, 0x7E: 448.0, 0xFE: -448.0}
    assert {c: float(E4M3_TABLE[c]) for c in known} == known


def test_table_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(E4M3_TABLE, ref, equal_nan=True)


def random_fp8(rows: int, cols: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    w[(w & 0x7F) == 0x7F] = 0x7E  # no NaN codes, so results compare bit for bit
    tiles = (-(-rows // 128), -(-cols // 128))
    scale = (rng.uniform(0.5, 2.0, tiles) * 2.0 ** rng.integers(-12, 4, tiles)).astype(np.float32)
    return w, scale


def hand_dequant(w, scale):
    out = np.empty(w.shape, np.float32)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = HAND[w[i, j]] * scale[i // 128, j // 128]  # float32 * float32
    return out


W, SCALE = random_fp8(200, 300)  # 2 x 3 tiles; the last row and column of tiles are partial
EXPECTED = hand_dequant(W, SCALE)


def same_bits(a, b):
    same_type = a.dtype == b.dtype == np.float32 and a.shape == b.shape
    return same_type and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_reference_dequant_with_edge_tiles():
    assert same_bits(dequantize_fp8(W, SCALE), EXPECTED)


def test_reference_row_range_crosses_a_tile():
    assert same_bits(dequantize_fp8(W, SCALE, rows=slice(100, 180)), EXPECTED[100:180])


@pytest.mark.parametrize("row0, n", [(0, 200), (100, 80), (199, 1)])
def test_numba_matches_reference(row0, n):
    out = np.full((n, 300), np.nan, np.float32)
    assert dequantize_fp8_rows(W, SCALE, row0, out) is out
    assert same_bits(out, dequantize_fp8(W, SCALE, rows=slice(row0, row0 + n)))


def test_numba_reads_a_read_only_memmap(tmp_path):
    W.tofile(tmp_path / "w.u8")
    mm = np.memmap(tmp_path / "w.u8", dtype=np.uint8, mode="r", shape=W.shape)
    out = dequantize_fp8_rows(mm, SCALE, 128, np.empty((72, 300), np.float32))
    assert same_bits(out, EXPECTED[128:])


def test_wrong_scale_shape_names_the_expected_one():
    bad = SCALE[:1]
    with pytest.raises(ValueError, match=r"float32\(2, 3\)"):
        dequantize_fp8(W, bad)
    with pytest.raises(ValueError, match=r"float32\(2, 3\)"):
        dequantize_fp8_rows(W, bad, 0, np.empty((200, 300), np.float32))


def test_numba_rejects_rows_outside_the_tensor():
    with pytest.raises(ValueError, match="outside"):
        dequantize_fp8_rows(W, SCALE, 150, np.empty((51, 300), np.float32))
