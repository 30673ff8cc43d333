"""Products with stored weights, decoded from their bytes: matvec for decode, tiled BLAS for prefill.

Each storage type has two numba kernels that read `Tensor.data` as stored (see quant/tensor.py):
  _matvec_<t>(out, w, x)     out[r] = w[r] . x; prange over groups of 4 rows, float32 accumulators
  _rows_<t>(out, w, rows)    out[i] = w[rows[i]] dequantized, bit-identical to the numpy reference
Prefill (`matmat`) dequantizes tiles of rows into a reused float32 scratch and multiplies with BLAS.
All kernels are lazy @njit: GGUF weights are read-only memmap views, which eager signatures reject.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange

from r1cpu.quant import registry
from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor

# Reassociation lets LLVM vectorize the float32 dot products. No nnan/ninf: inf and nan propagate.
_FASTMATH = {"reassoc", "contract"}
_TWO_M14 = np.float32(2.0**-14)


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


@njit(cache=True)
def _f16_at(a, o):
    """The little-endian f16 stored at bytes a[o], a[o + 1] of a uint8 row."""
    return f16_to_f32(np.int64(a[o]) | (np.int64(a[o + 1]) << 8))


@njit(cache=True)
def _bf16_to_f32(u):
    return np.uint32(np.int64(u) << 16).view(np.float32)


@njit(cache=True)
def _group(t, n_rows):
    """Rows of prange task t. The tail clamps to the last row: recomputed, the same value stored."""
    last = n_rows - 1
    r = t * 4
    return r, min(r + 1, last), min(r + 2, last), min(r + 3, last)


# ---- F32: float32[rows, D] ------------------------------------------------------------------


@njit(cache=True, fastmath=_FASTMATH)
def _dot4_f32(a0, a1, a2, a3, x):
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(x.size):
        xi = x[i]
        s0 += a0[i] * xi
        s1 += a1[i] * xi
        s2 += a2[i] * xi
        s3 += a3[i] * xi
    return s0, s1, s2, s3


@njit(cache=True, parallel=True)
def _matvec_f32(out, w, x):
    n = w.shape[0]
    for t in prange((n + 3) // 4):
        r0, r1, r2, r3 = _group(t, n)
        out[r0], out[r1], out[r2], out[r3] = _dot4_f32(w[r0], w[r1], w[r2], w[r3], x)


@njit(cache=True, parallel=True)
def _rows_f32(out, w, rows):
    for i in prange(rows.size):
        out[i] = w[rows[i]]


# ---- F16: uint16[rows, D] (the binary16 bits) -----------------------------------------------


@njit(cache=True, fastmath=_FASTMATH)
def _dot4_f16(a0, a1, a2, a3, x):
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(x.size):
        xi = x[i]
        s0 += f16_to_f32(a0[i]) * xi
        s1 += f16_to_f32(a1[i]) * xi
        s2 += f16_to_f32(a2[i]) * xi
        s3 += f16_to_f32(a3[i]) * xi
    return s0, s1, s2, s3


@njit(cache=True, parallel=True)
def _matvec_f16(out, w, x):
    n = w.shape[0]
    for t in prange((n + 3) // 4):
        r0, r1, r2, r3 = _group(t, n)
        out[r0], out[r1], out[r2], out[r3] = _dot4_f16(w[r0], w[r1], w[r2], w[r3], x)


@njit(cache=True, parallel=True)
def _rows_f16(out, w, rows):
    for i in prange(rows.size):
        a, y = w[rows[i]], out[i]
        for j in range(y.size):
            y[j] = f16_to_f32(a[j])


# ---- BF16: uint16[rows, D] (the high half of a float32) -------------------------------------


@njit(cache=True, fastmath=_FASTMATH)
def _dot4_bf16(a0, a1, a2, a3, x):
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(x.size):
        xi = x[i]
        s0 += _bf16_to_f32(a0[i]) * xi
        s1 += _bf16_to_f32(a1[i]) * xi
        s2 += _bf16_to_f32(a2[i]) * xi
        s3 += _bf16_to_f32(a3[i]) * xi
    return s0, s1, s2, s3


@njit(cache=True, parallel=True)
def _matvec_bf16(out, w, x):
    n = w.shape[0]
    for t in prange((n + 3) // 4):
        r0, r1, r2, r3 = _group(t, n)
        out[r0], out[r1], out[r2], out[r3] = _dot4_bf16(w[r0], w[r1], w[r2], w[r3], x)


@njit(cache=True, parallel=True)
def _rows_bf16(out, w, rows):
    for i in prange(rows.size):
        a, y = w[rows[i]], out[i]
        for j in range(y.size):
            y[j] = _bf16_to_f32(a[j])


# ---- Q8_0: uint8[rows, D/32 * 34], block = f16 d . int8 q[32], y = q * d ---------------------


@njit(cache=True, fastmath=_FASTMATH)
def _dot4_q8_0(a0, a1, a2, a3, x):
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for b in range(x.size // 32):
        o, xo = b * 34 + 2, b * 32
        p0 = p1 = p2 = p3 = np.float32(0.0)
        for j in range(32):
            xj = x[xo + j]
            p0 += np.float32(np.int8(a0[o + j])) * xj
            p1 += np.float32(np.int8(a1[o + j])) * xj
            p2 += np.float32(np.int8(a2[o + j])) * xj
            p3 += np.float32(np.int8(a3[o + j])) * xj
        s0 += _f16_at(a0, o - 2) * p0
        s1 += _f16_at(a1, o - 2) * p1
        s2 += _f16_at(a2, o - 2) * p2
        s3 += _f16_at(a3, o - 2) * p3
    return s0, s1, s2, s3


@njit(cache=True, parallel=True)
def _matvec_q8_0(out, w, x):
    n = w.shape[0]
    for t in prange((n + 3) // 4):
        r0, r1, r2, r3 = _group(t, n)
        out[r0], out[r1], out[r2], out[r3] = _dot4_q8_0(w[r0], w[r1], w[r2], w[r3], x)


@njit(cache=True, parallel=True)
def _rows_q8_0(out, w, rows):
    for i in prange(rows.size):
        a, y = w[rows[i]], out[i]
        for b in range(y.size // 32):
            d = _f16_at(a, b * 34)
            for j in range(32):
                y[b * 32 + j] = np.float32(np.int8(a[b * 34 + 2 + j])) * d


# ---- Q4_0: uint8[rows, D/32 * 18], block = f16 d . qs[16], byte j = elem j | elem j+16 << 4 --


@njit(cache=True, fastmath=_FASTMATH)
def _dot4_q4_0(a0, a1, a2, a3, x):
    # sum (q - 8) x = sum q x - 8 sum x: the offset is paid once per block. The nibbles are cast
    # back to uint8 so LLVM converts bytes to float (numba's int64 math vectorizes badly on AVX2).
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for b in range(x.size // 32):
        o, xo = b * 18 + 2, b * 32
        p0 = p1 = p2 = p3 = xs = np.float32(0.0)
        for j in range(16):
            xl, xh = x[xo + j], x[xo + 16 + j]
            xs += xl + xh
            p0 += np.float32(np.uint8(a0[o + j] & 15)) * xl + np.float32(np.uint8(a0[o + j] >> 4)) * xh
            p1 += np.float32(np.uint8(a1[o + j] & 15)) * xl + np.float32(np.uint8(a1[o + j] >> 4)) * xh
            p2 += np.float32(np.uint8(a2[o + j] & 15)) * xl + np.float32(np.uint8(a2[o + j] >> 4)) * xh
            p3 += np.float32(np.uint8(a3[o + j] & 15)) * xl + np.float32(np.uint8(a3[o + j] >> 4)) * xh
        xs *= np.float32(8.0)
        s0 += _f16_at(a0, o - 2) * (p0 - xs)
        s1 += _f16_at(a1, o - 2) * (p1 - xs)
        s2 += _f16_at(a2, o - 2) * (p2 - xs)
        s3 += _f16_at(a3, o - 2) * (p3 - xs)
    return s0, s1, s2, s3


@njit(cache=True, parallel=True)
def _matvec_q4_0(out, w, x):
    n = w.shape[0]
    for t in prange((n + 3) // 4):
        r0, r1, r2, r3 = _group(t, n)
        out[r0], out[r1], out[r2], out[r3] = _dot4_q4_0(w[r0], w[r1], w[r2], w[r3], x)


@njit(cache=True, parallel=True)
def _rows_q4_0(out, w, rows):
    for i in prange(rows.size):
        a, y = w[rows[i]], out[i]
        for b in range(y.size // 32):
            d = _f16_at(a, b * 18)
            for j in range(16):
                q = np.int64(a[b * 18 + 2 + j])
                y[b * 32 + j] = np.float32((q & 15) - 8) * d
                y[b * 32 + 16 + j] = np.float32((q >> 4) - 8) * d


# ---- Python side: checks, allocation, tiling -------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """The kernels of one storage type: `dtype` is Tensor.data's dtype, `view` the one they read."""

    dtype: type
    view: type
    matvec: Callable
    rows: Callable


CODECS: dict[GGMLType, Codec] = {
    GGMLType.F32: Codec(np.float32, np.float32, _matvec_f32, _rows_f32),
    GGMLType.F16: Codec(np.float16, np.uint16, _matvec_f16, _rows_f16),
    GGMLType.BF16: Codec(np.uint16, np.uint16, _matvec_bf16, _rows_bf16),
    GGMLType.Q8_0: Codec(np.uint8, np.uint8, _matvec_q8_0, _rows_q8_0),
    GGMLType.Q4_0: Codec(np.uint8, np.uint8, _matvec_q4_0, _rows_q4_0),
}

# Floats per prefill tile: 1 MiB, so the tile BLAS reads is still in this core's L2.
_TILE_FLOATS = 1 << 18
# Crossover measured on Q8_0 11264x2048, 2 threads: 4 matvecs 12.5 ms, tile+BLAS 19.8 ms; T=8: 23.7 / 20.
_MATVEC_MAX_T = 4
_scratch_local = threading.local()


def _codec_view(w: Tensor) -> tuple[Codec, np.ndarray]:
    """The codec of w and its data as the kernels read it, after checking the stored layout."""
    codec = CODECS.get(w.qtype)
    if codec is None:
        raise ValueError(f"{w.name}: no numba kernel for type {GGMLType(w.qtype).name}")
    try:
        row_bytes = registry.get(w.qtype).row_bytes(w.shape[-1])
    except ValueError as e:
        raise ValueError(f"{w.name}: {e}") from None
    want = (*w.shape[:-1], row_bytes // np.dtype(codec.dtype).itemsize)
    if w.data.dtype != codec.dtype or w.data.shape != want:
        raise ValueError(
            f"{w.name}: {GGMLType(w.qtype).name} {w.shape} must be stored as "
            f"{np.dtype(codec.dtype)}{want}, got {w.data.dtype}{w.data.shape}"
        )
    if not w.data.flags.c_contiguous:
        raise ValueError(f"{w.name}: weight data must be C-contiguous")
    return codec, w.data.view(codec.view)


def _check_linear(w: Tensor, x: np.ndarray, ndim: int) -> None:
    if len(w.shape) != 2 or x.ndim != ndim or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{w.name}: cannot multiply weight {w.shape} by x of shape {x.shape}")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"{w.name}: x must be C-contiguous float32, got {x.dtype} strides {x.strides}")


def _output(w: Tensor, out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{w.name}: out must be C-contiguous float32{shape}, got {out.dtype}{out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{w.name}: out is read-only")
    return out


def _scratch(n: int) -> np.ndarray:
    """A float32 buffer of n items, reused across calls (one per Python thread, grown on demand)."""
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch_local.buf = np.empty(n, np.float32)
    return buf[:n]


def matvec(w: Tensor, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w (rows, D) @ x float32[D] -> float32[rows], decoded from the stored bytes."""
    codec, data = _codec_view(w)
    _check_linear(w, x, 1)
    out = _output(w, out, (w.shape[0],))
    if w.shape[0]:
        codec.matvec(out, data, x)
    return out


def matmat(w: Tensor, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x float32[T, D] @ w.T -> float32[T, rows]: tiles of dequantized rows, multiplied by BLAS.
    Up to _MATVEC_MAX_T tokens, T matvecs are faster (they skip writing the float32 tile)."""
    codec, data = _codec_view(w)
    _check_linear(w, x, 2)
    n_rows, n_cols = w.shape
    out = _output(w, out, (x.shape[0], n_rows))
    if x.shape[0] <= _MATVEC_MAX_T:
        for t in range(x.shape[0]):
            matvec(w, x[t], out[t])
        return out
    step = max(1, min(n_rows, max(16, _TILE_FLOATS // max(n_cols, 1))))
    tile = _scratch(step * n_cols).reshape(step, n_cols)
    ids = np.arange(n_rows, dtype=np.intp)
    for r in range(0, n_rows, step):
        part = ids[r : r + step]
        codec.rows(tile[: part.size], data, part)
        np.matmul(x, tile[: part.size].T, out=out[:, r : r + part.size])
    return out


def matmat_f32(w: Tensor, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """F32 weights need no decoding: straight to BLAS."""
    _, data = _codec_view(w)
    _check_linear(w, x, 2)
    out = _output(w, out, (x.shape[0], w.shape[0]))
    return np.matmul(x, data.T, out=out)


def dequantize_rows(w: Tensor, rows) -> np.ndarray:
    """float32[len(rows), D]: the given rows of a 2-D weight (embedding lookup, get_rows)."""
    codec, data = _codec_view(w)
    rows = np.asarray(rows)
    if len(w.shape) != 2 or rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise ValueError(f"{w.name}: need a 2-D weight and 1-D integer row ids, got {w.shape}, {rows.shape}")
    rows = rows.astype(np.intp, copy=False)
    if rows.size and (rows.min() < 0 or rows.max() >= w.shape[0]):
        raise ValueError(f"{w.name}: row ids must be in [0, {w.shape[0]}), got [{rows.min()}, {rows.max()}]")
    out = np.empty((rows.size, w.shape[1]), np.float32)
    if rows.size:
        codec.rows(out, data, rows)
    return out


def dequantize_tensor(w: Tensor) -> np.ndarray:
    """float32[w.shape]: the whole tensor (norms, small weights); any number of dims."""
    codec, data = _codec_view(w)
    flat = data.reshape(-1, data.shape[-1])
    out = np.empty((flat.shape[0], w.shape[-1]), np.float32)
    if flat.shape[0]:
        codec.rows(out, flat, np.arange(flat.shape[0], dtype=np.intp))
    return out.reshape(w.shape)
