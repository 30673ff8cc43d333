"""Q4_K: 256 weights as 8 sub-blocks of 32, 4-bit levels, 6-bit scales and mins (ggml `block_q4_K`).

    byte 0       2          4             16                                      144
       +-------+----------+---------------+---------------------------------------+
       | d f16 | dmin f16 | scales[12]    | qs[128]                               |
       +-------+----------+---------------+---------------------------------------+
    type_size = 2 (d) + 2 (dmin) + 12 (scales) + 128 (qs) = 144 bytes per 256 weights (4.5 bits)

    scales: 8 pairs (sc_j, m_j) of 6 bits, j = sub-block (ggml get_scale_min_k4):
        byte 0..3    bits 0-5 sc_j        bits 6-7 sc_{j+4} >> 4       (j = 0..3)
        byte 4..7    bits 0-5 m_j         bits 6-7 m_{j+4} >> 4
        byte 8..11   bits 0-3 sc_{j+4}    bits 4-7 m_{j+4}             (low nibbles)
    qs: 4 chunks of 32 bytes; byte l of chunk c holds element 64c + l in its low nibble (sub-block
        2c) and element 64c + 32 + l in its high nibble (sub-block 2c + 1).

    dequantize:  y = (d * sc_j) * q - (dmin * m_j)
    quantize (quantize_row_q4_K_ref): per sub-block make_qkx2_quants(nmax 15, weights
        sqrt(mean x^2) + |x|, rmin -1, rdelta 0.1, 20 steps, squared error) -> (scale, min);
        d = max scale / 63, dmin = max min / 63; the 6-bit codes are nearest_int(63 / max * v);
        then every level is recomputed from the stored codes: q = nearest_int((x + dmin m) / (d sc)).
Q5_K shares the scale layout and the fit; `fit_and_encode` below serves both.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.kquant_search import F32, make_qkx2_quants, seq_sum
from r1cpu.quant.registry import Format, GGMLType, register

QK_K = 256
SUB = 32  # weights per sub-block
TYPE_SIZE = 2 + 2 + 12 + QK_K // 2
BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (QK_K // 2,))])
assert BLOCK.itemsize == TYPE_SIZE


def pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit codes u8[n, 8] (scales) and u8[n, 8] (mins) -> the 12 packed bytes u8[n, 12]."""
    return np.concatenate([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
    ], axis=1).astype(np.uint8)  # fmt: skip


def unpack_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes u8[n, 12] -> (sc u8[n, 8], m u8[n, 8])."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, m


def _code(v: np.ndarray, vmax: np.ndarray) -> np.ndarray:
    """min(63, (uint8)nearest_int(63 / vmax * v)): C stores the int in a uint8 before clamping."""
    inv = np.divide(F32(63), vmax, out=np.zeros_like(vmax), where=vmax > 0)
    return np.minimum((np.rint(inv[:, None] * v).astype(np.int64) & 0xFF), 63).astype(np.uint8)


def fit_and_encode(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """f32[n, 256] -> (d f16[n], dmin f16[n], packed scales u8[n, 12], levels u8[n, 256] in [0, nmax])."""
    x = blocks.reshape(-1, SUB)
    av = np.sqrt(seq_sum(x * x) / F32(SUB))
    scales, mins, L = make_qkx2_quants(x, av[:, None] + np.abs(x), nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(-1, 8), mins.reshape(-1, 8), L.reshape(-1, QK_K)
    max_scale = np.maximum(scales.max(axis=1), F32(0))  # C starts its running max at 0
    max_min = np.maximum(mins.max(axis=1), F32(0))
    ls, lm = _code(scales, max_scale), _code(mins, max_min)
    with np.errstate(over="ignore"):
        d, dmin = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
    step = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # (n, 8)
    offset = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    xs = blocks.reshape(-1, 8, SUB)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((xs + offset[:, :, None]) / step[:, :, None]), F32(0), F32(nmax))
    # a sub-block whose stored step is 0 keeps the levels of the search, as C's `continue` does
    L = np.where(step[:, :, None] != 0, q, L.reshape(-1, 8, SUB)).reshape(-1, QK_K)
    return d, dmin, pack_scales(ls, lm), L.astype(np.uint8)


def pack_nibbles(L: np.ndarray) -> np.ndarray:
    """Levels u8[n, 256] (low 4 bits used) -> qs u8[n, 128] in the chunk order above."""
    c = L.reshape(-1, 4, 2, 32) & 0xF
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, QK_K // 2)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs u8[n, 128] -> levels u8[n, 256]."""
    c = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (c & 0xF).reshape(-1, QK_K)


def scale_and_offset(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block d * sc and dmin * m, f32[n, 8, 1], from a structured block array."""
    sc, m = unpack_scales(b["scales"])
    step = b["d"].astype(np.float32)[:, None] * sc.astype(np.float32)
    offset = b["dmin"].astype(np.float32)[:, None] * m.astype(np.float32)
    return step[:, :, None], offset[:, :, None]


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    out = np.empty(len(blocks), BLOCK)
    out["d"], out["dmin"], out["scales"], L = fit_and_encode(blocks, 15, -1.0, 20)
    out["qs"] = pack_nibbles(L)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    step, offset = scale_and_offset(b)
    q = unpack_nibbles(b["qs"]).reshape(-1, 8, SUB).astype(np.float32)
    return (step * q - offset).reshape(-1, QK_K)


Q4_K = register(Format(GGMLType.Q4_K, QK_K, TYPE_SIZE, quantize_blocks, dequantize_blocks))
