"""GGUF reader: one read-only memory map, every field checked before use, zero-copy tensor views.

Layout (little-endian, ggml/src/gguf.cpp): magic "GGUF", u32 version, i64 n_tensors, i64 n_kv,
n_kv x (string key, u32 type, value), n_tensors x (string name, u32 n_dims, i64 ne[n_dims],
u32 ggml_type, u64 offset), padding to `general.alignment`, then the data blob. Tensor offsets are
relative to the blob. Shapes are returned in numpy order (ne reversed).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from r1cpu.quant.registry import GGMLType, get
from r1cpu.quant.tensor import Tensor

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# gguf_type -> (struct code, numpy dtype); STRING = 8 and ARRAY = 9 are handled apart.
SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}  # fmt: skip
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    """A malformed or unsupported GGUF file; the message names the file and the field or tensor."""


class _Cursor:
    """Bounds-checked sequential reads over the mapped header."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"truncated file: {what} needs {n} bytes at offset {self.pos}, file has {len(self.buf)}")
        out = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        return out

    def scalar(self, code: str, what: str):
        return struct.unpack(code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def array(self, key: str):
        etype = self.scalar("<I", f"array type of {key}")
        count = self.scalar("<Q", f"array length of {key}")
        if etype == STRING:
            # Each string needs at least its 8-byte length: refuse impossible counts before looping.
            if count * 8 > len(self.buf) - self.pos:
                self.fail(f"array {key} claims {count} strings, more than the file holds")
            return [self.string(f"element of {key}") for _ in range(count)]
        if etype not in SCALARS:
            self.fail(f"array {key} has unsupported element type {etype}")
        dtype = np.dtype(SCALARS[etype][1])
        raw = self.take(count * dtype.itemsize, f"array {key}")
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)

    def value(self, vtype: int, key: str):
        if vtype == STRING:
            return self.string(f"value of {key}")
        if vtype == ARRAY:
            return self.array(key)
        if vtype not in SCALARS:
            self.fail(f"key {key} has unknown value type {vtype}")
        return self.scalar(SCALARS[vtype][0], f"value of {key}")


class GGUFFile:
    """kv: metadata dict; tensors: name -> Tensor (views into the read-only map)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path}: cannot map file ({e})") from None
        cur = _Cursor(self.mmap, self.path)
        if cur.take(4, "magic") != MAGIC:
            cur.fail("not a GGUF file (bad magic)")
        version = cur.scalar("<I", "version")
        if version not in (2, 3):
            cur.fail(f"unsupported GGUF version {version} (expected 3)")
        n_tensors = cur.scalar("<q", "tensor count")
        n_kv = cur.scalar("<q", "metadata count")
        # Every KV pair and tensor info takes well over 8 bytes: reject impossible counts up front.
        if not 0 <= n_tensors <= len(self.mmap) // 8 or not 0 <= n_kv <= len(self.mmap) // 8:
            cur.fail(f"impossible counts: {n_tensors} tensors, {n_kv} metadata keys")
        self.kv = self._read_kv(cur, n_kv)
        infos = [self._read_tensor_info(cur) for _ in range(n_tensors)]
        self.alignment = self._alignment(cur)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors = self._build_tensors(cur, infos)

    def _read_kv(self, cur: _Cursor, n_kv: int) -> dict:
        kv = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in kv:
                cur.fail(f"duplicate metadata key {key}")
            kv[key] = cur.value(cur.scalar("<I", f"type of {key}"), key)
        return kv

    def _read_tensor_info(self, cur: _Cursor):
        name = cur.string("tensor name")
        n_dims = cur.scalar("<I", f"n_dims of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        ne = [cur.scalar("<q", f"dims of {name}") for _ in range(n_dims)]
        if any(d <= 0 or d > 1 << 40 for d in ne):
            cur.fail(f"tensor {name} has invalid dimensions {ne}")
        qtype = cur.scalar("<I", f"type of {name}")
        offset = cur.scalar("<Q", f"offset of {name}")
        return name, tuple(reversed(ne)), qtype, offset

    def _alignment(self, cur: _Cursor) -> int:
        align = self.kv.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            cur.fail(f"general.alignment {align!r} is not a power of two")
        return align

    def _build_tensors(self, cur: _Cursor, infos) -> dict[str, Tensor]:
        tensors = {}
        for name, shape, qtype, offset in infos:
            if name in tensors:
                cur.fail(f"duplicate tensor name {name}")
            fmt = self._format(cur, name, qtype)
            if shape[-1] % fmt.block_size:
                cur.fail(f"tensor {name}: row length {shape[-1]} is not a multiple of {fmt.name}'s block size {fmt.block_size}")
            nbytes = int(np.prod(shape[:-1], dtype=object)) * fmt.row_bytes(shape[-1])
            start = self.data_offset + offset
            if offset % self.alignment or start + nbytes > len(self.mmap):
                cur.fail(f"tensor {name}: data at offset {offset} (+{nbytes} bytes) lies outside the file or is misaligned")
            tensors[name] = Tensor.from_bytes(name, fmt.qtype, shape, self.mmap[start : start + nbytes])
        return tensors

    @staticmethod
    def _format(cur: _Cursor, name: str, qtype: int):
        try:
            return get(qtype)
        except ValueError:
            label = GGMLType(qtype).name if qtype in GGMLType._value2member_map_ else str(qtype)
            cur.fail(f"tensor {name} has unsupported type {label}")

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing tensor {name}") from None
