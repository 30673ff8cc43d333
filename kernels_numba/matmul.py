"""Products with stored weights, decoded from their bytes: matvec for decode, tiles + sgemm for prefill.

Each storage type has numba kernels that read `Tensor.data` as stored (see quant/tensor.py):
  _matvec_<t>(out, w, x)     float types: out[r] = w[r] . x; prange over groups of 4 rows, float32 sums
                             (Q8_0 / Q4_0 run on 8-bit activations instead: qlinear.py, intrinsics.py)
  _rows_<t>(out, w, rows)    out[i] = w[rows[i]] dequantized, bit-identical to the numpy reference
  _decode_<t>(y, a)          one row dequantized, for kernels that decode inside a parallel region
Prefill (`matmat`): each numba thread decodes a tile of rows into its own float32 scratch and multiplies
it with single-threaded cblas_sgemm, so every core multiplies and no BLAS thread pool runs.
All kernels are lazy @njit: GGUF weights are read-only memmap views, which eager signatures reject.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import get_thread_id, njit, prange

from r1cpu.kernels_numba import kquant_rows, qlinear, threads, token_tiles
from r1cpu.kernels_numba.actquant import ActQ8
from r1cpu.kernels_numba.intrinsics import (
    KIND_BF16,
    KIND_F16,
    KIND_F32,
    KIND_Q2_K,
    KIND_Q3_K,
    KIND_Q4_0,
    KIND_Q4_K,
    KIND_Q5_0,
    KIND_Q5_K,
    KIND_Q6_K,
    KIND_Q8_0,
    decode_q4_0,
    decode_q8_0,
    f16_to_f32,
)
from r1cpu.quant import registry
from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor

# Reassociation lets LLVM vectorize the float32 dot products. No nnan/ninf: inf and nan propagate.
_FASTMATH = {"reassoc", "contract"}
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums


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


@njit(cache=True)
def _matvec_f32_serial(out, w, x):
    n = w.shape[0]
    for t in range((n + 3) // 4):
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


@njit(cache=True)
def _matvec_f16_serial(out, w, x):
    n = w.shape[0]
    for t in range((n + 3) // 4):
        r0, r1, r2, r3 = _group(t, n)
        out[r0], out[r1], out[r2], out[r3] = _dot4_f16(w[r0], w[r1], w[r2], w[r3], x)


@njit(cache=True, inline="always")
def _decode_f16(y, a):
    for j in range(y.size):
        y[j] = f16_to_f32(a[j])


@njit(cache=True, parallel=True)
def _rows_f16(out, w, rows):
    for i in prange(rows.size):
        _decode_f16(out[i], w[rows[i]])


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


@njit(cache=True)
def _matvec_bf16_serial(out, w, x):
    n = w.shape[0]
    for t in range((n + 3) // 4):
        r0, r1, r2, r3 = _group(t, n)
        out[r0], out[r1], out[r2], out[r3] = _dot4_bf16(w[r0], w[r1], w[r2], w[r3], x)


@njit(cache=True, inline="always")
def _decode_bf16(y, a):
    for j in range(y.size):
        y[j] = _bf16_to_f32(a[j])


@njit(cache=True, parallel=True)
def _rows_bf16(out, w, rows):
    for i in prange(rows.size):
        _decode_bf16(out[i], w[rows[i]])


# ---- Q8_0: uint8[rows, D/32 * 34], block = f16 d . int8 q[32], y = q * d ---------------------


@njit(cache=True, inline="always")
def _decode_q8_0(y, a):
    decode_q8_0(y, a, y.size // 32)


@njit(cache=True, parallel=True)
def _rows_q8_0(out, w, rows):
    for i in prange(rows.size):
        _decode_q8_0(out[i], w[rows[i]])


# ---- Q4_0: uint8[rows, D/32 * 18], block = f16 d . qs[16], byte j = elem j | elem j+16 << 4 --


@njit(cache=True, inline="always")
def _decode_q4_0(y, a):
    decode_q4_0(y, a, y.size // 32)


@njit(cache=True, parallel=True)
def _rows_q4_0(out, w, rows):
    for i in prange(rows.size):
        _decode_q4_0(out[i], w[rows[i]])


# ---- prefill: each thread decodes its tile of rows and multiplies it with BLAS sgemm ---------


@njit(cache=True, inline="always")
def _decode_row(kind, y, a):
    if kind == KIND_Q8_0:
        _decode_q8_0(y, a)
    elif kind == KIND_Q4_0:
        _decode_q4_0(y, a)
    elif kind == KIND_F16:
        _decode_f16(y, a)
    elif kind == KIND_BF16:
        _decode_bf16(y, a)
    else:
        _decode_kquant_row(kind, y, a)


@njit(cache=True, inline="always")
def _decode_kquant_row(kind, y, a):
    if kind == KIND_Q4_K:
        kquant_rows.deq_q4_k(a, y)
    elif kind == KIND_Q6_K:
        kquant_rows.deq_q6_k(a, y)
    elif kind == KIND_Q5_0:
        kquant_rows.deq_q5_0(a, y)
    elif kind == KIND_Q5_K:
        kquant_rows.deq_q5_k(a, y)
    elif kind == KIND_Q3_K:
        kquant_rows.deq_q3_k(a, y)
    elif kind == KIND_Q2_K:
        kquant_rows.deq_q2_k(a, y)
    else:
        kquant_rows.deq_q5_1(a, y)


@njit(cache=True, inline="always")
def _sgemm_tile(sgemm, out, x, rows, r0, r1):
    # out[:, r0:r1] = x (T, D) @ rows[:r1-r0].T, rows C-contiguous float32 (BLAS on this thread)
    T, D = x.shape
    sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, T, r1 - r0, D, np.float32(1.0), x.ctypes, D,
          rows.ctypes, D, np.float32(0.0), out[:, r0:].ctypes, out.shape[1])  # fmt: skip


@njit(cache=True, parallel=True)
def _matmat_tiles(sgemm, out, x, w, kind, step, scratch):
    # out (T, n) = x (T, D) @ w.T, w (n, row) stored as `kind`; scratch (threads, step, D) float32
    # holds each thread's decoded tile; sgemm is cblas_sgemm, run on the calling thread.
    n = w.shape[0]
    for tile in prange((n + step - 1) // step):
        r0, r1 = tile * step, min(n, (tile + 1) * step)
        rows = scratch[get_thread_id()]
        for r in range(r0, r1):
            _decode_row(kind, rows[r - r0], w[r])
        _sgemm_tile(sgemm, out, x, rows, r0, r1)


@njit(cache=True, parallel=True)
def _matmat_f32_tiles(sgemm, out, x, w, step):
    # F32 weights need no decoding: sgemm reads the stored rows
    n = w.shape[0]
    for tile in prange((n + step - 1) // step):
        r0, r1 = tile * step, min(n, (tile + 1) * step)
        _sgemm_tile(sgemm, out, x, w[r0:], r0, r1)


# ---- Python side: checks, allocation, tiling -------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """The kernels of one storage type: `dtype` is Tensor.data's dtype, `view` the one they read.

    matvec is None for the types that run on 8-bit activations (qlinear.py); kind is the id the
    multi-format kernels decode the type by (None: they cannot, matmat takes the portable path);
    matvec_serial, if given, replaces matvec for weights under qlinear.SERIAL_BYTES."""

    dtype: type
    view: type
    matvec: Callable | None
    rows: Callable
    kind: int | None = None
    matvec_serial: Callable | None = None


CODECS: dict[GGMLType, Codec] = {
    GGMLType.F32: Codec(np.float32, np.float32, _matvec_f32, _rows_f32, KIND_F32, _matvec_f32_serial),
    GGMLType.F16: Codec(np.float16, np.uint16, _matvec_f16, _rows_f16, KIND_F16, _matvec_f16_serial),
    GGMLType.BF16: Codec(np.uint16, np.uint16, _matvec_bf16, _rows_bf16, KIND_BF16, _matvec_bf16_serial),
    GGMLType.Q8_0: Codec(np.uint8, np.uint8, None, _rows_q8_0, KIND_Q8_0),
    GGMLType.Q4_0: Codec(np.uint8, np.uint8, None, _rows_q4_0, KIND_Q4_0),
}

# Most floats in a thread's decoded prefill tile (4 MiB). Wide tiles pay: sgemm repacks x for every
# call, and a 32-row tile of a 2048-wide Q8_0 matrix ran at 72 GFLOP/s a core where 512 rows ran at 88.
_TILE_FLOATS = 1 << 20
# Tokens up to which float-activation types run T matvecs (they skip writing the float32 tile).
_MATVEC_MAX_T = 4
# Tokens up to which Q8_0 / Q4_0 run on 8-bit activations, reading each weight row once for all T
# (integer dots reach ~45 GFLOP/s per core here, sgemm ~75: past this the tile decode is paid back).
QUANT_MAX_T = 16
_local = threading.local()  # per Python thread: the activation buffers and the portable path's tile


@functools.lru_cache(maxsize=None)
def _row_bytes(qtype: GGMLType, n_cols: int) -> int:
    # memoized: registry.get re-runs its lazy imports on every call, which showed in decode profiles
    return registry.get(qtype).row_bytes(n_cols)


def _codec_view(w: Tensor) -> tuple[Codec, np.ndarray]:
    """The codec of w and its data as the kernels read it, after checking the stored layout.

    The result is memoized on the Tensor (weights are checked once, not on every decoded token),
    with the data as a plain ndarray: every view of a memmap runs memmap's Python __array_finalize__."""
    memo = w.__dict__.get("_kernel_view")
    if memo is not None:
        return memo
    codec = CODECS.get(w.qtype)
    if codec is None:
        raise ValueError(f"{w.name}: no numba kernel for type {GGMLType(w.qtype).name}")
    try:
        row_bytes = _row_bytes(w.qtype, w.shape[-1])
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
    memo = (codec, np.asarray(w.data).view(codec.view))
    object.__setattr__(w, "_kernel_view", memo)  # Tensor is frozen; the memo is not one of its fields
    return memo


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


def _act() -> ActQ8:
    act = getattr(_local, "act", None)
    if act is None:
        act = _local.act = ActQ8()
    return act


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 buffer of this shape, reused across calls (one per Python thread, grown on demand)."""
    n = int(np.prod(shape))
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < n:
        buf = _local.buf = np.empty(n, np.float32)
    return buf[:n].reshape(shape)


def matvec(w: Tensor, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w (rows, D) @ x float32[D] -> float32[rows], decoded from the stored bytes (Q8_0 and Q4_0
    multiply x quantized to 8-bit blocks, as ggml does)."""
    codec, data = _codec_view(w)
    _check_linear(w, x, 1)
    out = _output(w, out, (w.shape[0],))
    if not w.shape[0]:
        return out
    if codec.matvec is None:
        qlinear.matvec(out.reshape(1, -1), data, codec.kind, _act().quantize(x))
    else:
        _float_matvec(codec, data)(out, data, x)
    return out


def _float_matvec(codec: Codec, data: np.ndarray):
    small = codec.matvec_serial is not None and data.nbytes < qlinear.SERIAL_BYTES
    return codec.matvec_serial if small else codec.matvec


def matmat(w: Tensor, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x float32[T, D] @ w.T -> float32[T, rows].

    Few tokens: products read each weight row once (8-bit activations for Q8_0 / Q4_0, else T matvecs).
    More: Q4_0 takes 8-bit tiles of 8 tokens (token_tiles.py); other types have each thread decode
    tiles of rows and multiply them with single-threaded sgemm."""
    codec, data = _codec_view(w)
    _check_linear(w, x, 2)
    T, (n_rows, n_cols) = x.shape[0], w.shape
    out = _output(w, out, (T, n_rows))
    if not n_rows or not T:
        return out
    if codec.matvec is None and T <= QUANT_MAX_T:
        qlinear.matvec(out, data, codec.kind, _act().quantize(x))
    elif codec.matvec is not None and T <= _MATVEC_MAX_T:
        kernel = _float_matvec(codec, data)
        for t in range(T):
            kernel(out[t], data, x[t])
    elif codec.kind == KIND_Q4_0:  # 8-bit token tiles, twice sgemm's rate (token_tiles.py)
        token_tiles.matmat(out, data, x)
    elif codec.kind is not None and threads.sgemm() is not None:
        step = _tile_rows(n_rows, n_cols)
        if codec.kind == KIND_F32:
            _matmat_f32_tiles(threads.sgemm(), out, x, data, step)
        else:
            scratch = _scratch((threads.get_threads(), step, n_cols))
            _matmat_tiles(threads.sgemm(), out, x, data, codec.kind, step, scratch)
    else:
        _matmat_portable(codec, data, x, out)
    return out


def _tile_rows(n_rows: int, n_cols: int) -> int:
    """Rows per tile: an equal share per thread, cut to _TILE_FLOATS floats (but at least 16 rows)."""
    share = -(-n_rows // threads.get_threads())
    return max(1, min(n_rows, share, max(16, _TILE_FLOATS // max(n_cols, 1))))


def _matmat_portable(codec: Codec, data: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """Tiles decoded by the codec's parallel rows kernel, multiplied by numpy (BLAS) in this thread:
    for types the tile kernel cannot decode, or when no cblas_sgemm was found."""
    n_rows, n_cols = out.shape[1], x.shape[1]
    step = max(1, min(n_rows, max(16, _TILE_FLOATS // max(n_cols, 1))))
    tile = _scratch((step, n_cols))
    ids = np.arange(n_rows, dtype=np.intp)
    for r in range(0, n_rows, step):
        part = ids[r : r + step]
        codec.rows(tile[: part.size], data, part)
        np.matmul(x, tile[: part.size].T, out=out[:, r : r + part.size])


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
