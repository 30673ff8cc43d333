"""Q5_1: 32 weights as f16 scale and minimum and 32 five-bit levels (ggml `block_q5_1`).

    byte 0       2        4                8                                  24
       +-------+--------+----------------+----------------------------------+
       | d f16 | m f16  | qh u32 LE      | qs[16]                           |
       +-------+--------+----------------+----------------------------------+
    type_size = 2 (d) + 2 (m) + 4 (qh) + 16 (qs) = 24 bytes per 32 weights (6 bits)

    qh, qs: as Q5_0 (quant/q5_0.py).

    quantize (quantize_row_q5_1_ref):  d = (max - min) / 31,  m = min,  q = (uint8)((x - min) / d + 0.5)
    dequantize:                        y = q * d + m
The 32-block fallback llama.cpp uses for Q5_K tensors whose rows are not a multiple of 256.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.q5_0 import pack_5bit, unpack_5bit
from r1cpu.quant.registry import Format, GGMLType, register

BLOCK_SIZE = 32
TYPE_SIZE = 2 + 2 + 4 + 16
BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
assert BLOCK.itemsize == TYPE_SIZE


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    lo = blocks.min(axis=1, keepdims=True)
    d = (blocks.max(axis=1, keepdims=True) - lo) / np.float32(31)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    # truncation toward zero; (x - min) / d + 0.5 lies in [0.5, 31.5] up to rounding
    q = np.minimum(((blocks - lo) * inv + np.float32(0.5)).astype(np.int32), 31).astype(np.uint8)
    out = np.empty(len(blocks), BLOCK)
    out["d"], out["m"] = d[:, 0], lo[:, 0]
    out["qh"], out["qs"] = pack_5bit(q)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    return b["d"].astype(np.float32)[:, None] * unpack_5bit(b) + b["m"].astype(np.float32)[:, None]


Q5_1 = register(Format(GGMLType.Q5_1, BLOCK_SIZE, TYPE_SIZE, quantize_blocks, dequantize_blocks))
