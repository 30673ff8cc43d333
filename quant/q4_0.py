"""Q4_0: 32 weights as one f16 scale and 32 unsigned nibbles (ggml `block_q4_0`).

    byte  0   1   2          3                 17
        +-------+----------+----------+ ... +-----------+
        | d f16 | q16 | q0 | q17 | q1 |     | q31 | q15 |      byte 2+j: high nibble q[j+16], low q[j]
        +-------+----------+----------+ ... +-----------+
    type_size = 2 (d) + 16 (qs) = 18 bytes per 32 weights

    quantize (quantize_row_q4_0_ref):  max = the signed x with the largest |x| (first one on ties),
                                       d = max / -8,  q = min(15, (int8)(x / d + 8.5))
    dequantize:                        y = (q - 8) * d
Dividing by -8 maps max to q = 0 exactly, so the extreme value loses nothing. Arithmetic is float32 as in C.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.registry import Format, GGMLType, register

BLOCK_SIZE = 32
TYPE_SIZE = 2 + 16
BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK_SIZE // 2,))])
assert BLOCK.itemsize == TYPE_SIZE


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    imax = np.abs(blocks).argmax(axis=1)[:, None]
    d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-8)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    # the float -> int8 cast truncates toward zero, as C's (int8_t) does; x/d + 8.5 is in [0, 16.5)
    q = np.minimum((blocks * inv + np.float32(8.5)).astype(np.int8), 15).astype(np.uint8)
    out = np.empty(len(blocks), BLOCK)
    out["d"] = d[:, 0]
    out["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.float32)
    return b["d"].astype(np.float32)[:, None] * (q - np.float32(8))


Q4_0 = register(Format(GGMLType.Q4_0, BLOCK_SIZE, TYPE_SIZE, quantize_blocks, dequantize_blocks))
