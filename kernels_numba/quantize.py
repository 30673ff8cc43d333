"""Fast twins of `quant/`: row quantizers (bytes identical to quant/ and gguf-py) and FP8 dequant.

Each `@njit` kernel only computes, `prange` over rows, into a preallocated output; the Python wrapper
checks dtype, shape and contiguity. Kernels are lazy (no eager signatures), so read-only inputs such
as `np.memmap(mode="r")` views compile their own readonly specialisation.

float32 is kept where the C reference uses float: numba promotes float32 op int64 or float64 literal
to float64, so every constant below is an explicit np.float32.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numba import njit, prange

from r1cpu.quant import q4_0, q8_0
from r1cpu.quant.fp8 import BLOCK, E4M3_TABLE, check_fp8
from r1cpu.quant.registry import GGMLType, get

# --- scalar helpers ----------------------------------------------------------------------------


@njit(cache=True)
def _shr_rne(m, s):
    """m >> s rounded to nearest, ties to even (m >= 0, s >= 1)."""
    q = m >> s
    rem = m & ((1 << s) - 1)
    half = 1 << (s - 1)
    if rem > half or (rem == half and q & 1):
        q += 1
    return q


@njit(cache=True)
def _f16_bits(bits):
    """float32 bits -> IEEE half bits, rounding to nearest even like numpy's astype(float16)."""
    b = np.int64(bits)
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: keep the top payload bits, never collapse to infinity (numpy's rule)
        return sign | max(0x7C01, 0x7C00 | ((a & 0x7FFFFF) >> 13))
    if a >= 0x47800000:  # >= 2^16, or inf: beyond any rounding of 65504
        return sign | 0x7C00
    if a >= 0x38800000:  # half normal; a mantissa carry rolls into the exponent (65520 -> inf)
        return sign | _shr_rne(a - 0x38000000, 13)
    if a >= 0x33000000:  # half subnormal, in units of 2^-24
        return sign | _shr_rne((a & 0x7FFFFF) | 0x800000, 126 - (a >> 23))
    return sign  # below 2^-25 rounds to zero


@njit(cache=True)
def _roundf(v):
    """C roundf of a float32 (half away from zero), as int; |v| < 2^23 so v - trunc(v) is exact."""
    a = abs(v)
    t = int(a)
    if a - np.float32(t) >= np.float32(0.5):
        t += 1
    return -t if v < 0 else t


@njit(cache=True)
def _put_f16(y, i, d):
    h = _f16_bits(np.float32(d).view(np.uint32))
    y[i] = h & 0xFF
    y[i + 1] = h >> 8


# --- block kernels -----------------------------------------------------------------------------


@njit(cache=True)
def _q8_0_block(x, y):
    amax = np.float32(0)
    for j in range(32):
        amax = max(amax, abs(x[j]))
    d = amax / np.float32(127)
    inv = np.float32(1) / d if d != 0 else np.float32(0)
    _put_f16(y, 0, d)
    for j in range(32):
        y[2 + j] = _roundf(x[j] * inv) & 0xFF


@njit(cache=True)
def _q4_0_block(x, y):
    # the first element of largest |x| keeps its sign: d = max / -8 maps it to nibble 0
    vmax = x[0]
    for j in range(1, 32):
        if abs(x[j]) > abs(vmax):
            vmax = x[j]
    d = vmax / np.float32(-8)
    inv = np.float32(1) / d if d != 0 else np.float32(0)
    _put_f16(y, 0, d)
    for j in range(16):
        lo = min(15, int(x[j] * inv + np.float32(8.5)))
        hi = min(15, int(x[j + 16] * inv + np.float32(8.5)))
        y[2 + j] = lo | (hi << 4)


# --- row kernels -------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _quantize_q8_0(x, out):
    nb = x.shape[1] // 32
    for r in prange(x.shape[0]):
        for b in range(nb):
            _q8_0_block(x[r, 32 * b : 32 * b + 32], out[r, 34 * b : 34 * b + 34])


@njit(cache=True, parallel=True)
def _quantize_q4_0(x, out):
    nb = x.shape[1] // 32
    for r in prange(x.shape[0]):
        for b in range(nb):
            _q4_0_block(x[r, 32 * b : 32 * b + 32], out[r, 18 * b : 18 * b + 18])


@njit(cache=True, parallel=True)
def _quantize_f16(bits, out):
    for r in prange(bits.shape[0]):
        for j in range(bits.shape[1]):
            out[r, j] = _f16_bits(bits[r, j])


@njit(cache=True, parallel=True)
def _quantize_bf16(bits, out):
    # ggml_compute_fp32_to_bf16: quiet a NaN, otherwise round the low half to nearest even
    for r in prange(bits.shape[0]):
        for j in range(bits.shape[1]):
            b = np.int64(bits[r, j])
            if (b & 0x7FFFFFFF) > 0x7F800000:
                out[r, j] = (b >> 16) | 0x40
            else:
                out[r, j] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16


# --- registry and wrappers ---------------------------------------------------------------------


def _f32(x: np.ndarray, out: np.ndarray) -> None:
    out.view(np.float32)[...] = x  # a plain copy of the bits; nothing to compute


def _f16(x: np.ndarray, out: np.ndarray) -> None:
    _quantize_f16(x.view(np.uint32), out.view(np.uint16))


def _bf16(x: np.ndarray, out: np.ndarray) -> None:
    _quantize_bf16(x.view(np.uint32), out.view(np.uint16))


# (x: float32[rows, n] C-contiguous, out: uint8[rows, row_bytes] C-contiguous) -> None.
# A new type (k-quants) plugs in by registering its numpy Format in quant/ and adding an entry here.
FAST_QUANTIZERS: dict[GGMLType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLType.F32: _f32,
    GGMLType.F16: _f16,
    GGMLType.BF16: _bf16,
    GGMLType.Q8_0: _quantize_q8_0,
    GGMLType.Q4_0: _quantize_q4_0,
}
assert q8_0.TYPE_SIZE == 34 and q4_0.TYPE_SIZE == 18  # the block kernels hard-code these layouts
# The k-quant and Q5_0 / Q5_1 row quantizers add their entries on import; they use the f16 helpers
# above, hence the late import.
from r1cpu.kernels_numba import kquant_quantize  # noqa: E402, F401


def _check(name: str, a: np.ndarray, dtype, shape: tuple[int | None, int | None]) -> None:
    """Raise unless a is a C-contiguous 2-D dtype array of this shape (None: any length)."""
    ok = isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == 2 and a.flags.c_contiguous
    if not ok or any(want not in (None, got) for want, got in zip(shape, a.shape)):
        got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
        want = [n if n is not None else ":" for n in shape]
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)}{want}, got {got}")


def quantize_rows_into(x: np.ndarray, qtype: GGMLType | int | str, out: np.ndarray) -> np.ndarray:
    """float32[rows, n] -> out uint8[rows, row_bytes(n)], filled in place and returned."""
    fmt = get(qtype)
    if fmt.qtype not in FAST_QUANTIZERS:
        raise ValueError(f"no fast quantizer for {fmt.name}; have {[t.name for t in FAST_QUANTIZERS]}")
    _check("x", x, np.float32, (None, None))
    _check("out", out, np.uint8, (x.shape[0], fmt.row_bytes(x.shape[1])))
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    FAST_QUANTIZERS[fmt.qtype](x, out)
    return out


def quantize_rows(x: np.ndarray, qtype: GGMLType | int | str) -> np.ndarray:
    """float32[rows, n] -> uint8[rows, row_bytes(n)] in `qtype`, bytes identical to gguf-py."""
    _check("x", x, np.float32, (None, None))
    out = np.empty((x.shape[0], get(qtype).row_bytes(x.shape[1])), np.uint8)
    return quantize_rows_into(x, qtype, out)


# --- FP8 ---------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _dequantize_fp8(w, scale_inv, table, row0, br, bc, out):
    for i in prange(out.shape[0]):
        r = row0 + i
        for j in range(out.shape[1]):
            out[i, j] = table[w[r, j]] * scale_inv[r // br, j // bc]


def dequantize_fp8_rows(
    w_u8: np.ndarray,
    scale_inv: np.ndarray,
    row0: int,
    out: np.ndarray,
    block: tuple[int, int] = BLOCK,
) -> np.ndarray:
    """Rows row0 : row0 + len(out) of the whole fp8 tensor w_u8[R, C] -> out float32[n, C], returned.

    w_u8 is the full tensor (a memmap view is fine: only the selected rows are read), so the tile
    of each row and the shape of scale_inv are checked against the whole weight.
    """
    check_fp8(w_u8, scale_inv, block)
    _check("out", out, np.float32, (None, w_u8.shape[1]))
    if not 0 <= row0 <= w_u8.shape[0] - out.shape[0]:
        raise ValueError(f"rows {row0}:{row0 + out.shape[0]} are outside the {w_u8.shape[0]} rows of w")
    _dequantize_fp8(w_u8, scale_inv, E4M3_TABLE, np.intp(row0), block[0], block[1], out)
    return out


@njit(cache=True, parallel=True, nogil=True)
def _widen_bf16(bits, out):
    for i in prange(bits.shape[0]):
        out[i] = np.uint32(bits[i]) << np.uint32(16)


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16, any shape) -> float32, exactly (a bf16 is the top half of a float32)."""
    if bits.dtype != np.uint16:
        raise ValueError(f"widen_bf16 takes uint16 bit patterns, got {bits.dtype}")
    out = np.empty(bits.shape, dtype=np.uint32)
    _widen_bf16(np.ascontiguousarray(bits).reshape(-1), out.reshape(-1))
    return out.view(np.float32)
