"""Q8_0: 32 weights as one f16 scale and 32 signed bytes (ggml `block_q8_0`).

    byte  0   1   2     3     4           33
        +-------+-----+-----+-----+ ... +-----+
        | d f16 | q0  | q1  | q2  |     | q31 |      q: int8
        +-------+-----+-----+-----+ ... +-----+
    type_size = 2 (d) + 32 (qs) = 34 bytes per 32 weights

    quantize (quantize_row_q8_0_ref):  d = amax / 127,  q = roundf(x / d)  (half away from zero)
    dequantize:                        y = q * d
All arithmetic is float32, like the C reference, so the bytes match ggml and gguf-py exactly.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.registry import Format, GGMLType, register

BLOCK_SIZE = 32
TYPE_SIZE = 2 + 32
BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK_SIZE,))])
assert BLOCK.itemsize == TYPE_SIZE


def roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero); np.round would round half to even."""
    a = np.abs(v)
    r = np.floor(a)
    r += a - r >= 0.5  # a - floor(a) is exact in float32, so ties are seen exactly
    return np.copysign(r, v)


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    # an all-zero block gets d = 0 and inverse 0, so every q is 0
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    out = np.empty(len(blocks), BLOCK)
    out["d"] = d[:, 0]
    out["qs"] = roundf(blocks * inv)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    return b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)


Q8_0 = register(Format(GGMLType.Q8_0, BLOCK_SIZE, TYPE_SIZE, quantize_blocks, dequantize_blocks))
