"""Q6_K: 256 weights as 16 sub-blocks of 16, 6-bit levels, int8 scales (ggml `block_q6_K`).

    byte 0                    128             192               208       210
       +----------------------+---------------+-----------------+---------+
       | ql[128]              | qh[64]        | scales[16] int8 | d f16   |
       +----------------------+---------------+-----------------+---------+
    type_size = 128 (ql) + 64 (qh) + 16 (scales) + 2 (d) = 210 bytes per 256 weights (6.5625 bits)

    Two halves h = 0, 1 of 128 elements each use ql[64h ..], qh[32h ..]; for l < 32, element
    128h + 32k + l (k = 0..3) has
        low 4 bits   ql[64h + l] (k = 0: low nibble, k = 2: high nibble),
                     ql[64h + 32 + l] (k = 1: low nibble, k = 3: high nibble)
        high 2 bits  bits 2k, 2k + 1 of qh[32h + l]
    The scale of element e is scales[e // 16].

    dequantize:  y = (d * scales[e // 16]) * (q - 32)
    quantize (quantize_row_q6_K_ref): per sub-block make_qx_quants(nmax 32, weights x^2) -> scale;
        with s = the scale of largest |s|: d = -s / 128, scales = min(127, nearest_int(-128 / s * scale));
        then q = clamp(nearest_int(x / (d * scales)), -32, 31) + 32.  A block whose scales are all
        below GROUP_MAX_EPS is stored as zeros.
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.kquant_search import F32, GROUP_MAX_EPS, make_qx_quants, signed_absmax
from r1cpu.quant.registry import Format, GGMLType, register

QK_K = 256
TYPE_SIZE = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2
BLOCK = np.dtype([("ql", "u1", (QK_K // 2,)), ("qh", "u1", (QK_K // 4,)), ("scales", "i1", (16,)), ("d", "<f2")])
assert BLOCK.itemsize == TYPE_SIZE

_SHIFT = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)


def _requantize(blocks, scales, L):
    """(d f16[n], scales i8[n, 16], levels u8[n, 256]) from the search results."""
    max_scale = signed_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        d = (F32(1) / iscale).astype(np.float16)
        sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int64).astype(np.int8)
        step = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # (n, 16)
        q = np.clip(np.rint(blocks.reshape(-1, 16, 16) / step[:, :, None]), F32(-32), F32(31)) + F32(32)
    L = np.where(step[:, :, None] != 0, q, L.reshape(-1, 16, 16)).reshape(-1, QK_K)
    d[zero], sc[zero], L[zero] = 0, 0, 0
    return d, sc, L.astype(np.uint8)


def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.float32)
    scales, L = make_qx_quants(blocks.reshape(-1, 16), 32)
    d, sc, L = _requantize(blocks, scales.reshape(-1, 16), L.reshape(-1, QK_K))
    q = L.reshape(-1, 2, 4, 32)  # (block, half, k, l)
    out = np.empty(len(blocks), BLOCK)
    out["d"], out["scales"] = d, sc
    low = q & 0xF
    out["ql"] = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(-1, QK_K // 2)
    out["qh"] = np.bitwise_or.reduce((q >> 4) << _SHIFT, axis=2).reshape(-1, QK_K // 4)
    return out.view(np.uint8).reshape(len(blocks), TYPE_SIZE)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(blocks, dtype=np.uint8).view(BLOCK)[:, 0]
    ql = b["ql"].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0xF).reshape(-1, 2, 4, 32)  # nibble-major: k = 0, 1 low nibbles, k = 2, 3 high
    qh = (b["qh"].reshape(-1, 2, 1, 32) >> _SHIFT) & 3
    q = (ql | (qh << 4)).astype(np.float32) - F32(32)
    step = b["d"].astype(np.float32)[:, None] * b["scales"].astype(np.float32)
    return (step[:, :, None] * q.reshape(-1, 16, 16)).reshape(-1, QK_K)


Q6_K = register(Format(GGMLType.Q6_K, QK_K, TYPE_SIZE, quantize_blocks, dequantize_blocks))
