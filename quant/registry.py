"""Tensor storage types: ggml ids, block geometry, and the registry of numpy reference codecs.

Each format module (floats, q8_0, q4_0, ...) registers a `Format` whose byte size is written as the
sum of its fields. `quantize`/`dequantize` here dispatch through the registry, so the converter and
the runtime name a type and never branch on it. Fast numba twins live in `kernels_numba/`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np


class GGMLType(enum.IntEnum):
    """ggml_type ids as stored in GGUF tensor infos (ggml.h / gguf-py GGMLQuantizationType)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class Format:
    """A storage type: `block_size` elements take `type_size` bytes.

    quantize_blocks:   f32[n, block_size] -> u8[n, type_size]   (numpy reference, bit-exact with ggml)
    dequantize_blocks: u8[n, type_size]   -> f32[n, block_size]
    """

    qtype: GGMLType
    block_size: int
    type_size: int
    quantize_blocks: Callable[[np.ndarray], np.ndarray]
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]

    @property
    def name(self) -> str:
        return self.qtype.name

    def row_bytes(self, n_cols: int) -> int:
        if n_cols % self.block_size:
            raise ValueError(f"{self.name}: row length {n_cols} is not a multiple of {self.block_size}")
        return n_cols // self.block_size * self.type_size


_FORMATS: dict[GGMLType, Format] = {}


def register(fmt: Format) -> Format:
    _FORMATS[fmt.qtype] = fmt
    return fmt


def get(qtype: GGMLType | int | str) -> Format:
    """The registered format for a ggml type id, enum or (case-insensitive) name."""
    _load_builtin_formats()
    try:
        key = GGMLType[qtype.upper()] if isinstance(qtype, str) else GGMLType(qtype)
        return _FORMATS[key]
    except (KeyError, ValueError):
        raise ValueError(f"unsupported tensor type {qtype!r}") from None


def supported() -> list[GGMLType]:
    _load_builtin_formats()
    return sorted(_FORMATS)


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """f32[..., n] -> u8[..., n / block_size * type_size] (numpy reference path)."""
    fmt = get(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, fmt.block_size)
    out = fmt.quantize_blocks(rows)
    return out.reshape(*x.shape[:-1], fmt.row_bytes(x.shape[-1]))


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """u8[..., row_bytes] -> f32[..., n] (numpy reference path)."""
    fmt = get(qtype)
    data = np.ascontiguousarray(data).view(np.uint8)
    blocks = data.reshape(-1, fmt.type_size)
    out = fmt.dequantize_blocks(blocks)
    n = data.shape[-1] // fmt.type_size * fmt.block_size
    return out.reshape(*data.shape[:-1], n)


def _load_builtin_formats() -> None:
    # Importing the format modules registers them; done lazily to avoid an import cycle.
    from r1cpu.quant import floats, q4_0, q8_0  # noqa: F401
    from r1cpu.quant import q2_k, q3_k, q4_k, q5_0, q5_1, q5_k, q6_k  # noqa: F401
