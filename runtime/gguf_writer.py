"""Streaming GGUF writer: declare metadata and tensor infos first, then stream each tensor's bytes
in order, chunk by chunk, so no tensor (not even a stacked expert tensor) is ever held whole.

Metadata values carry explicit GGUF types because llama.cpp reads keys type-strictly.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import numpy as np

from r1cpu.quant.registry import GGMLType, get
from r1cpu.runtime.gguf_reader import ARRAY, DEFAULT_ALIGNMENT, SCALARS, STRING

UINT32, INT32, FLOAT32, BOOL = 4, 5, 6, 7


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


class GGUFWriter:
    """States: collect kv + infos -> write_header() -> for each tensor in order: write_data chunks."""

    def __init__(self, alignment: int = DEFAULT_ALIGNMENT):
        self.alignment = alignment
        self.kv: dict[str, tuple[int, object, int | None]] = {}
        self.infos: list[tuple[str, tuple[int, ...], GGMLType, int]] = []  # name, shape, type, nbytes
        self._next = 0  # index of the tensor being streamed
        self._written = 0  # bytes of it written so far
        self._header_done = False

    # metadata
    def add(self, key: str, value, vtype: int) -> None:
        self.kv[key] = (vtype, value, None)

    def add_array(self, key: str, values, etype: int) -> None:
        self.kv[key] = (ARRAY, values, etype)

    # tensors
    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: GGMLType) -> None:
        """shape in numpy order; the file stores it reversed (ne[0] fastest)."""
        if len(name.encode()) >= 64:
            raise ValueError(f"tensor name {name!r} is longer than ggml's 63-byte limit")
        fmt = get(qtype)
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * fmt.row_bytes(shape[-1])
        self.infos.append((name, tuple(int(d) for d in shape), fmt.qtype, nbytes))

    @property
    def total_bytes(self) -> int:
        return sum(_pad(n, self.alignment) for *_, n in self.infos)

    def write_header(self, f: BinaryIO) -> None:
        if self.alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", self.alignment, UINT32)
        out = [b"GGUF", struct.pack("<Iqq", 3, len(self.infos), len(self.kv))]
        for key, (vtype, value, etype) in self.kv.items():
            out += [_string(key), struct.pack("<I", vtype), self._value(vtype, value, etype)]
        offset = 0
        for name, shape, qtype, nbytes in self.infos:
            dims = struct.pack(f"<I{len(shape)}q", len(shape), *reversed(shape))
            out += [_string(name), dims, struct.pack("<IQ", int(qtype), offset)]
            offset += _pad(nbytes, self.alignment)
        header = b"".join(out)
        f.write(header + b"\0" * (_pad(len(header), self.alignment) - len(header)))
        self._header_done = True

    def write_data(self, f: BinaryIO, chunk: np.ndarray) -> None:
        """Append bytes of the current tensor; moves to the next tensor once this one is complete."""
        if not self._header_done or self._next >= len(self.infos):
            raise RuntimeError("write_data called before write_header or after the last tensor")
        name, _, _, nbytes = self.infos[self._next]
        raw = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
        if self._written + raw.size > nbytes:
            raise ValueError(f"tensor {name}: more data than its {nbytes} bytes")
        f.write(raw.data)
        self._written += raw.size
        if self._written == nbytes:
            f.write(b"\0" * (_pad(nbytes, self.alignment) - nbytes))
            self._next, self._written = self._next + 1, 0

    def finish(self) -> None:
        if self._next != len(self.infos):
            name = self.infos[self._next][0]
            raise RuntimeError(f"tensor {name} was not fully written")

    @staticmethod
    def _value(vtype: int, value, etype: int | None) -> bytes:
        if vtype == STRING:
            return _string(value)
        if vtype != ARRAY:
            return struct.pack(SCALARS[vtype][0], value)
        head = struct.pack("<IQ", etype, len(value))
        if etype == STRING:
            return head + b"".join(_string(v) for v in value)
        return head + np.asarray(value, dtype=np.dtype(SCALARS[etype][1]).newbyteorder("<")).tobytes()
