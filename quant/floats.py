"""Plain float storage: F32, F16 and BF16, one element per "block".

    F32   4 bytes  the float32 itself (little-endian)
    F16   2 bytes  IEEE half, numpy's float32 -> float16 cast (round to nearest even)
    BF16  2 bytes  the high half of the float32, rounded as ggml_compute_fp32_to_bf16:

          float32  | s | e e e e e e e e | m m m m m m m  m m m m m m m m m m m m m m m m |
          bf16     | s | e e e e e e e e | m m m m m m m |  <- rounded off, nearest even ->
"""

from __future__ import annotations

import numpy as np

from r1cpu.quant.registry import Format, GGMLType, register


def _f32_quantize(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint8)


def _f32_dequantize(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.float32).copy()


def _f16_quantize(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype(np.float16).view(np.uint8)


def _f16_dequantize(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits as uint16, exactly as ggml (and gguf-py) round them."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    # uint64 so that the rounding carry out of 0xFFFF.... cannot wrap
    rounded = (u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16
    # a NaN keeps its top payload bits and is made quiet, never rounded into an infinity
    return np.where(is_nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def _bf16_quantize(blocks: np.ndarray) -> np.ndarray:
    return bf16_bits(blocks).view(np.uint8)


def _bf16_dequantize(blocks: np.ndarray) -> np.ndarray:
    high = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32)
    return (high << 16).view(np.float32)


F32 = register(Format(GGMLType.F32, 1, 4, _f32_quantize, _f32_dequantize))
F16 = register(Format(GGMLType.F16, 1, 2, _f16_quantize, _f16_dequantize))
BF16 = register(Format(GGMLType.BF16, 1, 2, _bf16_quantize, _bf16_dequantize))
