"""A small streaming safetensors writer/reader, and the BF16 / F8_E4M3 codecs numpy lacks.

File layout: u64 little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with spaces
to a multiple of 8, then the raw little-endian tensor bytes back to back.
The safetensors package's numpy API cannot write BF16 or F8_E4M3, hence this module.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ITEM_SIZE = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
RAW_DTYPE = {"BF16": np.uint16, "F8_E4M3": np.uint8, "F32": np.float32}
F8_MAX = 448.0


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: `chunks()` yields arrays whose bytes, concatenated, are its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_SIZE[self.dtype]


def header_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: Path, specs: list[TensorSpec]) -> int:
    """Write `specs` in order, one chunk at a time; returns the number of data bytes."""
    raw = header_bytes(specs, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            written = 0
            for chunk in spec.chunks():
                data = np.ascontiguousarray(chunk, dtype=RAW_DTYPE[spec.dtype])
                f.write(data.data)
                written += data.nbytes
            if written != spec.nbytes:
                raise ValueError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
    return sum(spec.nbytes for spec in specs)


def read_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def read_raw(path: Path, name: str) -> np.ndarray:
    """The stored bits of one tensor (uint16 for BF16, uint8 for F8_E4M3, float32 for F32)."""
    entry = read_header(path)[name]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = entry["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, dtype=RAW_DTYPE[entry["dtype"]]).reshape(entry["shape"])


def read_f32(path: Path, name: str) -> np.ndarray:
    """One tensor decoded to float32 (FP8 weights stay un-scaled: the caller applies scale_inv)."""
    raw = read_raw(path, name)
    decode = {np.uint16: bf16_to_f32, np.uint8: f8_e4m3_to_f32}.get(raw.dtype.type)
    return decode(raw) if decode else raw.copy()


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (inputs here are finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f8_e4m3_to_f32(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn decode: bias 7, subnormals m/8 * 2^-6, no infinities (0x7F/0xFF are NaN)."""
    b = bits.astype(np.int32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0**-6, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    mag = np.where((b & 0x7F) == 0x7F, np.nan, mag)
    return (sign * mag).astype(np.float32)


def f32_to_f8_e4m3(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> float8_e4m3fn bits; callers scale |x| to <= 448 first."""
    x = np.asarray(x, dtype=np.float32)
    mag = np.minimum(np.abs(x), F8_MAX).astype(np.float64)
    # Spacing of representable values: 2^(E-3) for normals (E = exponent), 2^-9 below 2^-6.
    _, exp = np.frexp(mag)
    quantum = np.exp2(np.maximum(exp - 1, -6) - 3.0)
    q = np.rint(mag / quantum) * quantum  # exact: power-of-two division, rint ties to even
    _, qexp = np.frexp(q)
    normal = q >= 2.0**-6
    e_field = np.where(normal, qexp - 1 + 7, 0)
    m_field = np.where(normal, q / np.exp2(qexp - 1.0) * 8 - 8, q / 2.0**-9)
    bits = (e_field << 3) | m_field.astype(np.int64)
    return (bits | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)
