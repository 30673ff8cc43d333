"""Q3_K: 256 weights as 16 sub-blocks of 16, 3-bit signed levels, 6-bit scales (ggml `block_q3_K`).

    byte 0            32                               96             108      110
       +--------------+--------------------------------+--------------+--------+
       | hmask[32]    | qs[64]                         | scales[12]   | d f16  |
       +--------------+--------------------------------+--------------+--------+
    type_size = 32 (hmask) + 64 (qs) + 12 (scales) + 2 (d) = 110 bytes per 256 weights (3.4375 bits)

    qs: the low 2 bits of each level, laid out as Q2_K's (quant/q2_k.py).
    hmask: bit b of byte l is the third bit of element 32b + l.
    scales: 16 codes s_j of 6 bits; bytes 0..7 hold the low nibbles (byte j: s_j low, s_{j+8} high),
        bits 2g, 2g + 1 of byte 8 + k hold the top 2 bits of s_{4g + k}.

    dequantize:  y = (d * (s_j - 32)) * (q - 4),  q = low2 | hbit << 2 in [0, 7]
    quantize (quantize_row_q3_K_ref): per sub-block make_q3_quants(nmax 4) -> scale; with s = the
        scale of largest |s|: d = -s / 32, codes clamp(nearest_int(-32 / s * scale), -32, 31) + 32;
        then q = clamp(nearest_int(x / (d * (code - 32))), -4, 3) + 4.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.kquant_search import F32, make_q3_quants, signed_absmax
from r1cpu.quant.q2_k import pack_2bit, unpack_2bit
from r1cpu.quant.registry import Format, GGMLType, register

QK_K = 256
TYPE_SIZE = QK_K // 8 + QK_K // 4 + 12 + 2
BLOCK = np.dtype([("hmask", "u1", (QK_K // 8,)), ("qs", "u1", (QK_K // 4,)), ("scales", "u1", (12,)), ("d", "<f2")])
assert BLOCK.itemsize == TYPE_SIZE

_BIT = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
_PAIR = np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)


def pack_scales(codes: np.ndarray) -> np.ndarray:
    """6-bit codes u8[n, 16] -> u8[n, 12]."""
    low = (codes[:, :8] & 0xF) | ((codes[:, 8:] & 0xF) << 4)
    high = np.bitwise_or.reduce((codes.reshape(-1, 4, 4) >> 4) << _PAIR, axis=1)
    return np.concatenate([low, high], axis=1)


def unpack_scales(s: np.ndarray) -> np.ndarray:
    """u8[n, 12] -> signed scales s_j - 32 as float32[n, 16]."""
    low = (s[:, None, :8] >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(-1, 16) & 0xF
    high = ((s[:, None, 8:] >> _PAIR) & 3).reshape(-1, 16)
    return (low | (high << 4)).astype(np.float32) - F32(32)


def _encode(blocks, scales, L):
    """(d f16[n], packed scales u8[n, 12], levels u8[n, 256] in [0, 7]) from the search results."""
    max_scale = signed_absmax(scales)
    none = max_scale == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-32) / max_scale
        codes = (np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)
        d = (F32(1) / iscale).astype(np.float16)
    codes[none], d[none] = 0, 0  # C leaves the scale bytes zeroed and d = 0
    packed = pack_scales(codes)
    step = d.astype(np.float32)[:, None] * unpack_scales(packed)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(blocks.reshape(-1, 16, 16) / step[:, :, None]), F32(-4), F32(3)) + F32(4)
    L = np.where(step[:, :, None] != 0, q, L.reshape(-1, 16, 16)).reshape(-1, QK_K)
    return d, packed, L.astype(np.uint8)


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    scales, L = make_q3_quants(blocks.reshape(-1, 16), 4)
    out = np.empty(len(blocks), BLOCK)
    out["d"], out["scales"], L = _encode(blocks, scales.reshape(-1, 16), L)
    out["hmask"] = np.bitwise_or.reduce((L.reshape(-1, 8, 32) >> 2) << _BIT, axis=1)
    out["qs"] = pack_2bit(L & 3)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    step = b["d"].astype(np.float32)[:, None] * unpack_scales(b["scales"])
    high = ((b["hmask"][:, None, :] >> _BIT) & 1).reshape(-1, QK_K)
    q = (unpack_2bit(b["qs"]) | (high << 2)).astype(np.float32) - F32(4)
    return (step[:, :, None] * q.reshape(-1, 16, 16)).reshape(-1, QK_K)


Q3_K = register(Format(GGMLType.Q3_K, QK_K, TYPE_SIZE, quantize_blocks, dequantize_blocks))
