"""Activations quantized once per linear to 8-bit blocks, for the integer dot products of intrinsics.py.

Each row of x float32[T, D] (D a multiple of 32) becomes, per block b of 32 values:
    d[t, b] = max |x| / 127,  q[t, 32b + j] = round(x / d)  int8 in [-127, 127]
    s[t, 8b + i] = -8 * (q[t, 32b + 4i] + ... + q[t, 32b + 4i + 3])   int32, i < 8
as ggml's block_q8_0, but with a float32 scale and the blocks split into arrays so the kernels load
32 activation bytes with one instruction. s is Q4_0's offset (its nibbles n stand for n - 8), laid out
as the 8 int32 lanes of the kernels' `vpmaddwd` sums, so a block pays it with one integer add.

`ActQ8` owns reusable buffers: quantizing the next token's vector allocates nothing.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

QK = 32
LANES = 8  # int32 lanes of s per block


@njit(cache=True, inline="always")
def quantize_block(q, d, s, x, o, b):
    """x[o:o+32] -> one block: q[o:o+32], d[b], s[8b:8b+8] (kernels that make activations call this too)."""
    amax = np.float32(0.0)
    for j in range(o, o + QK):
        amax = max(amax, abs(x[j]))
    inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
    for i in range(LANES):
        total = np.int32(0)
        for j in range(o + 4 * i, o + 4 * i + 4):
            v = np.int32(np.rint(x[j] * inv))
            q[j] = v
            total += v
        s[LANES * b + i] = -8 * total
    d[b] = amax / np.float32(127.0)


@njit(cache=True, inline="always")
def _quantize_row(q, d, s, x):
    for b in range(x.size // QK):
        quantize_block(q, d, s, x, b * QK, b)


@njit(cache=True)
def _quantize_serial(q, d, s, x):
    for t in range(x.shape[0]):
        _quantize_row(q[t], d[t], s[t], x[t])


@njit(cache=True, parallel=True)
def _quantize_parallel(q, d, s, x):
    for t in prange(x.shape[0]):
        _quantize_row(q[t], d[t], s[t], x[t])


# Values at or above which quantizing runs in parallel (2048 take ~2 us, starting a region ~10 us):
# a decode token's 16 heads of 128 (MLA's q_nope) stay serial, a prompt's rows go parallel.
PARALLEL_VALUES = 1 << 15


class ActQ8:
    """Quantized activations q int8[T, D], d float32[T, D/32], s int32[T, D/4], views of buffers kept
    for reuse. The arrays are rewritten by the next `quantize`; callers use them before quantizing again.
    """

    def __init__(self):
        self._q = np.empty(0, np.int8)
        self._d = np.empty(0, np.float32)
        self._s = np.empty(0, np.int32)
        self.q = self.d = self.s = None

    def quantize(self, x: np.ndarray) -> "ActQ8":
        """x float32[D] or [T, D], C-contiguous, D % 32 == 0. Returns self (2-D views)."""
        x2 = x.reshape(1, -1) if x.ndim == 1 else x
        if x2.ndim != 2 or x2.shape[1] % QK or x2.dtype != np.float32 or not x2.flags.c_contiguous:
            raise ValueError(f"quantize: need C-contiguous float32 [T, D] with D % {QK} == 0, got {x.dtype}{x.shape}")
        if self.q is None or self.q.shape != x2.shape:  # new views only when the shape changes
            self._views(*x2.shape)
        (_quantize_parallel if x2.size >= PARALLEL_VALUES else _quantize_serial)(self.q, self.d, self.s, x2)
        return self

    def _views(self, T: int, D: int) -> None:
        nb = D // QK
        if self._q.size < T * D:
            self._q = np.empty(T * D, np.int8)
            self._d = np.empty(T * nb, np.float32)
            self._s = np.empty(T * nb * LANES, np.int32)
        self.q = self._q[: T * D].reshape(T, D)
        self.d = self._d[: T * nb].reshape(T, nb)
        self.s = self._s[: T * nb * LANES].reshape(T, nb * LANES)

    def dequantize(self) -> np.ndarray:
        """float32[T, D]: what the integer kernels effectively multiply by (for tests)."""
        T, D = self.q.shape
        return (self.q.reshape(T, -1, QK).astype(np.float32) * self.d[:, :, None]).reshape(T, D)


def quantize(x: np.ndarray) -> ActQ8:
    """A fresh ActQ8 of x (allocates; the runtime keeps one ActQ8 per call site instead)."""
    return ActQ8().quantize(x)
