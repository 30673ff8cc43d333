"""Q8_0 / Q4_0 linear layers on 8-bit activations: x is quantized once (actquant.py) and every
output is an integer block dot product (intrinsics.py).

    _rows(out, w, kind, xq, xd, xs, r0, r1)    out[t, r] = w[r] . x[t] for rows r0..r1-1, all t
Decode (one token) and short batches read each weight row once and dot it with every token while it
is in L1. Matrices under SERIAL_BYTES run without a parallel region: starting one costs more than
the whole product (the tiny models' linears are a few KiB).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from r1cpu.kernels_numba.intrinsics import dot_row

# Weight bytes under which a product runs serially (a parallel region costs ~10-30 us to start).
SERIAL_BYTES = 1 << 16
# Rows per parallel task: small enough to balance two threads, large enough to amortize the loop.
CHUNK_ROWS = 16


@njit(cache=True, inline="always")
def _rows(out, w, kind, xq, xd, xs, r0, r1):
    T, D = xq.shape
    nb, rb = xd.shape[1], w.shape[1]
    for r in range(r0, r1):
        for t in range(T):
            out[t, r] = dot_row(kind, w, r * rb, xq, t * D, xd, xs, t * nb, nb)


@njit(cache=True)
def _matvec_serial(out, w, kind, xq, xd, xs):
    _rows(out, w, kind, xq, xd, xs, 0, w.shape[0])


@njit(cache=True, parallel=True)
def _matvec_parallel(out, w, kind, xq, xd, xs):
    n = w.shape[0]
    for c in prange((n + CHUNK_ROWS - 1) // CHUNK_ROWS):
        _rows(out, w, kind, xq, xd, xs, c * CHUNK_ROWS, min(n, (c + 1) * CHUNK_ROWS))


def matvec(out: np.ndarray, w: np.ndarray, kind: int, act) -> np.ndarray:
    """out float32[T, rows] = w (rows, row_bytes) uint8 of `kind` times act (ActQ8 of T rows)."""
    kernel = _matvec_serial if w.nbytes < SERIAL_BYTES else _matvec_parallel
    kernel(out, w, kind, act.q, act.d, act.s)
    return out
