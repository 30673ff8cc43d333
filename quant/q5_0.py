"""Q5_0: 32 weights as one f16 scale and 32 five-bit levels (ggml `block_q5_0`).

    byte 0       2                6                                   22
       +-------+----------------+-----------------------------------+
       | d f16 | qh u32 LE      | qs[16]                            |
       +-------+----------------+-----------------------------------+
    type_size = 2 (d) + 4 (qh) + 16 (qs) = 22 bytes per 32 weights (5.5 bits)

    qs byte j: low nibble = low 4 bits of element j, high nibble = those of element j + 16.
    qh bit j: bit 4 of element j (j = 0..31).

    quantize (quantize_row_q5_0_ref):  max = the signed x of largest |x| (first on ties),
                                       d = max / -16,  q = min(31, (int8)(x / d + 16.5))
    dequantize:                        y = (q - 16) * d
The 32-block fallback llama.cpp uses for Q4_K tensors whose rows are not a multiple of 256.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.registry import Format, GGMLType, register

BLOCK_SIZE = 32
TYPE_SIZE = 2 + 4 + 16
BLOCK = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
assert BLOCK.itemsize == TYPE_SIZE

BIT = np.arange(32, dtype=np.uint32)


def pack_5bit(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels u8[n, 32] in [0, 31] -> (qh u32[n], qs u8[n, 16]) (shared with Q5_1)."""
    qh = np.bitwise_or.reduce((q.astype(np.uint32) >> 4) << BIT, axis=1)
    return qh, (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def unpack_5bit(b: np.ndarray) -> np.ndarray:
    """Structured blocks with qh and qs -> levels float32[n, 32]."""
    low = np.concatenate([b["qs"] & 0xF, b["qs"] >> 4], axis=1)
    high = ((b["qh"][:, None] >> BIT) & 1).astype(np.uint8)
    return (low | (high << 4)).astype(np.float32)


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    imax = np.abs(blocks).argmax(axis=1)[:, None]
    d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-16)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    # (int8_t) truncates toward zero; x / d + 16.5 lies in [0, 32.5)
    q = np.minimum((blocks * inv + np.float32(16.5)).astype(np.int8), 31).astype(np.uint8)
    out = np.empty(len(blocks), BLOCK)
    out["d"] = d[:, 0]
    out["qh"], out["qs"] = pack_5bit(q)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    return b["d"].astype(np.float32)[:, None] * (unpack_5bit(b) - np.float32(16))


Q5_0 = register(Format(GGMLType.Q5_0, BLOCK_SIZE, TYPE_SIZE, quantize_blocks, dequantize_blocks))
