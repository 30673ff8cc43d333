"""GGUF reader: one read-only memory map, every field checked before use, zero-copy tensor views.

Layout (little-endian, ggml/src/gguf.cpp): magic "GGUF", u32 version, i64 n_tensors, i64 n_kv,
n_kv x (string key, u32 type, value), n_tensors x (string name, u32 n_dims, i64 ne[n_dims],
u32 ggml_type, u64 offset), padding to `general.alignment`, then the data blob. Tensor offsets are
relative to the blob. Shapes are returned in numpy order (ne reversed).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from r1cpu.quant.registry import GGMLType, get
from r1cpu.quant.tensor import Tensor

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME = 63  # ggml's GGML_MAX_NAME is 64 bytes including the NUL

# gguf_type -> (struct code, numpy dtype); STRING = 8 and ARRAY = 9 are handled apart.
SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}  # fmt: skip
UINT32, BOOL, STRING, ARRAY = 4, 7, 8, 9
# The smallest possible KV pair (empty key, type, 1-byte value) and tensor info (empty name,
# n_dims, one dim, type, offset): a count needing more bytes than the file has is refused at once.
MIN_KV_BYTES, MIN_INFO_BYTES = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


class GGUFError(ValueError):
    """A malformed or unsupported GGUF file; the message names the file and the field or tensor."""


class _Cursor:
    """Bounds-checked sequential reads over the mapped header. Sizes are Python ints, so no claimed
    length can wrap around; every length is compared with what is left before anything is copied.
    Reads go through a memoryview: slicing the memmap itself costs ~10 us each (a 129k-token vocab)."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.mv, self.pos, self.path = memoryview(buf), 0, path

    @property
    def left(self) -> int:
        return len(self.mv) - self.pos

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {_printable(what)}")

    def need(self, n: int, what: str) -> int:
        """Check n more bytes exist; return where they start and move past them."""
        if n < 0 or n > self.left:
            self.fail(f"truncated file: {what} needs {n} bytes at offset {self.pos}, file has {len(self.mv)}")
        self.pos += n
        return self.pos - n

    def take(self, n: int, what: str) -> bytes:
        start = self.need(n, what)
        return self.mv[start : start + n].tobytes()

    def scalar(self, code: str, what: str):
        return struct.unpack_from(code, self.mv, self.need(struct.calcsize(code), what))[0]

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.scalar("<Q", what)
        if max_len is not None and n > max_len:
            self.fail(f"{what} at offset {self.pos - 8} is {n} bytes long (at most {max_len} allowed)")
        start = self.need(n, what)
        try:
            return str(self.mv[start : start + n], "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at offset {start} is not valid UTF-8")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings: string() inlined, as vocabularies hold ~250k of them."""
        mv, pos, end, out = self.mv, self.pos, len(self.mv), []
        try:
            for _ in range(count):
                n = struct.unpack_from("<Q", mv, pos)[0] if pos + 8 <= end else None
                if n is None or n > end - pos - 8:
                    self.fail(f"truncated file: {what} {len(out)} at offset {pos} runs past the end")
                out.append(str(mv[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            self.fail(f"{what} {len(out)} at offset {pos + 8} is not valid UTF-8")
        self.pos = pos
        return out

    def boolean(self, what: str) -> bool:
        b = self.scalar("<B", what)
        if b > 1:
            self.fail(f"{what} is a bool stored as {b} (only 0 or 1 allowed)")
        return b == 1

    def array(self, key: str):
        etype = self.scalar("<I", f"array type of {key}")
        count = self.scalar("<Q", f"array length of {key}")
        if etype == ARRAY:
            self.fail(f"array {key} holds arrays (nested arrays are not allowed)")
        if etype == STRING:
            # Each string needs at least its 8-byte length: refuse impossible counts before looping.
            if count * 8 > self.left:
                self.fail(f"array {key} claims {count} strings, more than the file holds")
            return self.strings(count, f"element of {key}")
        if etype not in SCALARS:
            self.fail(f"array {key} has unsupported element type {etype}")
        dtype = np.dtype(SCALARS[etype][1])
        raw = self.take(count * dtype.itemsize, f"array {key} of {count} elements")
        if etype == BOOL and max(raw, default=0) > 1:
            self.fail(f"array {key} holds a bool other than 0 or 1")
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)

    def value(self, vtype: int, key: str):
        if vtype == STRING:
            return self.string(f"value of {key}")
        if vtype == ARRAY:
            return self.array(key)
        if vtype == BOOL:
            return self.boolean(f"value of {key}")
        if vtype not in SCALARS:
            self.fail(f"key {key} has unknown value type {vtype}")
        return self.scalar(SCALARS[vtype][0], f"value of {key}")


class GGUFFile:
    """kv: metadata dict; types: key -> GGUF value type; tensors: name -> Tensor (views into the
    read-only map). Nothing is allocated from a claimed size before it is checked against the file."""

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
            hint = ", the file looks big-endian" if version and not version & 0xFFFF else ""
            cur.fail(f"unsupported GGUF version {version} (expected 3{hint})")
        n_tensors = cur.scalar("<q", "tensor count")
        n_kv = cur.scalar("<q", "metadata count")
        if n_tensors < 0 or n_kv < 0:
            cur.fail(f"negative counts: {n_tensors} tensors, {n_kv} metadata keys")
        need = n_kv * MIN_KV_BYTES + n_tensors * MIN_INFO_BYTES
        if need > cur.left:
            cur.fail(f"impossible counts: {n_tensors} tensors and {n_kv} metadata keys need at least {need} "
                     f"more bytes, the file has {cur.left} (truncated?)")  # fmt: skip
        self.kv, self.types = self._read_kv(cur, n_kv)
        infos = [self._read_tensor_info(cur) for _ in range(n_tensors)]
        self.alignment = self._alignment(cur)
        self.data_offset = _pad(cur.pos, self.alignment)
        self.tensors = self._build_tensors(cur, infos)

    @staticmethod
    def _read_kv(cur: _Cursor, n_kv: int) -> tuple[dict, dict]:
        kv, types = {}, {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in kv:
                cur.fail(f"duplicate metadata key {key}")
            types[key] = cur.scalar("<I", f"type of {key}")
            kv[key] = cur.value(types[key], key)
        return kv, types

    @staticmethod
    def _read_tensor_info(cur: _Cursor):
        name = cur.string("tensor name", MAX_NAME)
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
        if "general.alignment" not in self.kv:
            return DEFAULT_ALIGNMENT
        align = self.kv["general.alignment"]
        if self.types["general.alignment"] != UINT32 or align <= 0 or align & (align - 1):
            cur.fail(f"general.alignment {align!r} is not a UINT32 power of two")
        return align

    def _build_tensors(self, cur: _Cursor, infos) -> dict[str, Tensor]:
        """llama.cpp's rule: data is packed in info order, each tensor padded to the alignment, so
        offsets are fully determined; anything else (gaps, overlaps, reordering) is refused."""
        tensors, expected = {}, 0
        for name, shape, qtype, offset in infos:
            if name in tensors:
                cur.fail(f"duplicate tensor name {name}")
            nbytes = self._nbytes(cur, name, shape, qtype)
            if offset % self.alignment:
                cur.fail(f"tensor {name}: data offset {offset} is misaligned (alignment {self.alignment})")
            if offset != expected:
                cur.fail(f"tensor {name}: data offset {offset}, expected {expected} (data is packed in info order)")
            start = self.data_offset + offset
            if start + nbytes > len(self.mmap):
                cur.fail(f"tensor {name}: data at offset {offset} (+{nbytes} bytes) lies outside the file")
            tensors[name] = Tensor.from_bytes(name, qtype, shape, self.mmap[start : start + nbytes])
            expected = offset + _pad(nbytes, self.alignment)
        return tensors

    @staticmethod
    def _nbytes(cur: _Cursor, name: str, shape: tuple[int, ...], qtype: int) -> int:
        try:
            fmt = get(qtype)
        except ValueError:
            label = GGMLType(qtype).name if qtype in GGMLType._value2member_map_ else str(qtype)
            cur.fail(f"tensor {name} has unsupported type {label}")
        if shape[-1] % fmt.block_size:
            cur.fail(f"tensor {name}: row length {shape[-1]} is not a multiple of {fmt.name}'s block size {fmt.block_size}")
        return math.prod(shape[:-1]) * fmt.row_bytes(shape[-1])  # Python ints: cannot overflow

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing tensor {name}") from None


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _printable(text: str, keep: int = 160) -> str:
    """Keys and names inside messages come from the file: escape what would break the one-line
    message (newlines, control bytes) and cut the middle out of what would flood it, keeping the
    start (what was read) and the end (what is wrong with it)."""
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"
