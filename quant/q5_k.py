"""Q5_K: 256 weights as 8 sub-blocks of 32, 5-bit levels, 6-bit scales and mins (ggml `block_q5_K`).

    byte 0       2          4             16            48                         176
       +-------+----------+---------------+-------------+---------------------------+
       | d f16 | dmin f16 | scales[12]    | qh[32]      | qs[128]                   |
       +-------+----------+---------------+-------------+---------------------------+
    type_size = 2 (d) + 2 (dmin) + 12 (scales) + 32 (qh) + 128 (qs) = 176 bytes per 256 weights (5.5 bits)

    scales, qs: as Q4_K (quant/q4_k.py); qs holds the low 4 bits of each level.
    qh: bit 2c of byte l is bit 4 of element 64c + l, bit 2c + 1 that of element 64c + 32 + l.

    dequantize:  y = (d * sc_j) * q - (dmin * m_j),  q in [0, 31]
    quantize (quantize_row_q5_K_ref): as Q4_K with nmax 31, rmin -0.5 and 15 steps.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.q4_k import QK_K, SUB, fit_and_encode, pack_nibbles, scale_and_offset, unpack_nibbles
from r1cpu.quant.registry import Format, GGMLType, register

TYPE_SIZE = 2 + 2 + 12 + QK_K // 8 + QK_K // 2
BLOCK = np.dtype([
    ("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qh", "u1", (QK_K // 8,)), ("qs", "u1", (QK_K // 2,)),
])  # fmt: skip
assert BLOCK.itemsize == TYPE_SIZE

_BIT = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # qh bit b <-> elements 32b .. 32b + 31


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    out = np.empty(len(blocks), BLOCK)
    out["d"], out["dmin"], out["scales"], L = fit_and_encode(blocks, 31, -0.5, 15)
    out["qs"] = pack_nibbles(L)
    out["qh"] = np.bitwise_or.reduce((L.reshape(-1, 8, 32) >> 4) << _BIT, axis=1)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    step, offset = scale_and_offset(b)
    high = (b["qh"][:, None, :] >> _BIT) & 1  # (n, 8, 32)
    q = (unpack_nibbles(b["qs"]).reshape(-1, 8, SUB) | (high << 4)).astype(np.float32)
    return (step * q - offset).reshape(-1, QK_K)


Q5_K = register(Format(GGMLType.Q5_K, QK_K, TYPE_SIZE, quantize_blocks, dequantize_blocks))
