"""Q2_K: 256 weights as 16 sub-blocks of 16, 2-bit levels, 4-bit scales and mins (ggml `block_q2_K`).

    byte 0              16                                80       82         84
       +----------------+----------------------------------+--------+----------+
       | scales[16]     | qs[64]                           | d f16  | dmin f16 |
       +----------------+----------------------------------+--------+----------+
    type_size = 16 (scales) + 64 (qs) + 2 (d) + 2 (dmin) = 84 bytes per 256 weights (2.625 bits)

    scales[j]: low nibble sc_j, high nibble m_j, for sub-block j (elements 16j .. 16j + 15).
    qs: two halves h = 0, 1 of 32 bytes; bits 2k, 2k + 1 of byte 32h + l hold element 128h + 32k + l.

    dequantize:  y = (d * sc_j) * q - (dmin * m_j),  q in [0, 3]
    quantize (quantize_row_q2_K_ref): per sub-block make_qkx2_quants(nmax 3, weights |x|, rmin -0.5,
        rdelta 0.1, 15 steps, absolute error) -> (scale, min); d = max scale / 15, dmin = max min / 15,
        4-bit codes nearest_int(15 / max * v); then q = nearest_int((x + dmin m) / (d sc)).
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.kquant_search import F32, make_qkx2_quants
from r1cpu.quant.registry import Format, GGMLType, register

QK_K = 256
TYPE_SIZE = QK_K // 16 + QK_K // 4 + 2 + 2
BLOCK = np.dtype([("scales", "u1", (16,)), ("qs", "u1", (QK_K // 4,)), ("d", "<f2"), ("dmin", "<f2")])
assert BLOCK.itemsize == TYPE_SIZE

_SHIFT = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)


def pack_2bit(L: np.ndarray) -> np.ndarray:
    """Levels u8[n, 256] in [0, 3] -> qs u8[n, 64] (shared with Q3_K)."""
    return np.bitwise_or.reduce(L.reshape(-1, 2, 4, 32) << _SHIFT, axis=2).reshape(-1, QK_K // 4)


def unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """qs u8[n, 64] -> levels u8[n, 256]."""
    return ((qs.reshape(-1, 2, 1, 32) >> _SHIFT) & 3).reshape(-1, QK_K)


def _codes(v: np.ndarray, vmax: np.ndarray) -> np.ndarray:
    """nearest_int(15 / vmax * v) as int64 (0 where vmax <= 0: C stores no code then)."""
    inv = np.divide(F32(15), vmax, out=np.zeros_like(vmax), where=vmax > 0)
    return np.rint(inv[:, None] * v).astype(np.int64)


def _encode(blocks, scales, mins, L):
    """(d f16[n], dmin f16[n], scales u8[n, 16], levels u8[n, 256]) from the search results."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    codes = ((_codes(scales, max_scale) | (_codes(mins, max_min) << 4)) & 0xFF).astype(np.uint8)
    with np.errstate(over="ignore"):
        d, dmin = (max_scale / F32(15)).astype(np.float16), (max_min / F32(15)).astype(np.float16)
    step = d.astype(np.float32)[:, None] * (codes & 0xF).astype(np.float32)
    offset = dmin.astype(np.float32)[:, None] * (codes >> 4).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((blocks.reshape(-1, 16, 16) + offset[:, :, None]) / step[:, :, None])
    q = np.clip(q, F32(0), F32(3))
    L = np.where(step[:, :, None] != 0, q, L.reshape(-1, 16, 16)).reshape(-1, QK_K)
    return d, dmin, codes, L.astype(np.uint8)


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    x = blocks.reshape(-1, 16)
    scales, mins, L = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
    out = np.empty(len(blocks), BLOCK)
    out["d"], out["dmin"], out["scales"], L = _encode(blocks, scales.reshape(-1, 16), mins.reshape(-1, 16), L)
    out["qs"] = pack_2bit(L)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    step = b["d"].astype(np.float32)[:, None] * (b["scales"] & 0xF).astype(np.float32)
    offset = b["dmin"].astype(np.float32)[:, None] * (b["scales"] >> 4).astype(np.float32)
    q = unpack_2bit(b["qs"]).reshape(-1, 16, 16).astype(np.float32)
    return (step[:, :, None] * q - offset[:, :, None]).reshape(-1, QK_K)


Q2_K = register(Format(GGMLType.Q2_K, QK_K, TYPE_SIZE, quantize_blocks, dequantize_blocks))
