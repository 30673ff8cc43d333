"""Read a Hugging Face checkpoint folder without holding it in memory.

Safetensors files are parsed from their JSON headers; tensor bytes are read on demand with
positioned reads (not mmap), so what the converter has in memory is only what it is working on.
FP8 weights (float8_e4m3fn + `<name>_scale_inv` per 128x128 block) come back dequantized to float32.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r1cpu.kernels_numba.quantize import dequantize_fp8_rows, widen_bf16

# safetensors dtype -> (numpy storage dtype, how to widen to float32)
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A problem with the input folder; the message names the file or tensor."""


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the data
    nbytes: int


def _read_header(path: Path) -> dict[str, Entry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: safetensors header length {n} is impossible")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: bad safetensors header ({e})") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        entry = Entry(path, info["dtype"], shape, 8 + n + begin, end - begin)
        if entry.dtype in DTYPES and entry.nbytes != int(np.prod(shape)) * np.dtype(DTYPES[entry.dtype]).itemsize:
            raise CheckpointError(f"{path}: tensor {name} has {entry.nbytes} bytes for shape {shape}")
        if entry.offset + entry.nbytes > size:
            raise CheckpointError(f"{path}: tensor {name} lies past the end of the file (truncated download?)")
        entries[name] = entry
    return entries


def _shard_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).exists()]
        if missing:
            raise CheckpointError(f"{src}: missing shard {missing[0]} listed in {index.name}")
        return [src / f for f in files]
    if (src / "model.safetensors").exists():
        return [src / "model.safetensors"]
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")


class Checkpoint:
    """config: the parsed config.json; names(): all tensor names; rows(name, start, stop) -> float32."""

    def __init__(self, src: str | Path):
        self.src = Path(src)
        if not self.src.is_dir():
            raise CheckpointError(f"{self.src}: not a directory")
        config_path = self.src / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{self.src}: missing config.json")
        self.config = json.loads(config_path.read_text())
        self.entries: dict[str, Entry] = {}
        for path in _shard_files(self.src):
            self.entries.update(_read_header(path))
        self.block = tuple((self.config.get("quantization_config") or {}).get("weight_block_size", (128, 128)))

    def names(self) -> list[str]:
        return [n for n in self.entries if not n.endswith("_scale_inv")]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.src}: missing tensor {name}") from None

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 rows [start, stop) of a tensor (first axis); the whole tensor by default."""
        e = self._entry(name)
        stop = e.shape[0] if stop is None else stop
        if e.dtype not in DTYPES:
            raise CheckpointError(f"{e.path.name}: tensor {name} has unsupported dtype {e.dtype}")
        if e.dtype == "F8_E4M3":
            return self._fp8_rows(name, e, start, stop)
        raw = self._raw_rows(e, start, stop)
        if e.dtype == "BF16":
            return widen_bf16(raw)
        return raw.astype(np.float32, copy=False)

    def _raw_rows(self, e: Entry, start: int, stop: int) -> np.ndarray:
        dtype = np.dtype(DTYPES[e.dtype])
        row = int(np.prod(e.shape[1:], dtype=np.int64)) * dtype.itemsize
        raw = _pread(e.path, e.offset + start * row, (stop - start) * row).view(dtype)
        return raw.reshape((stop - start,) + e.shape[1:])

    def _fp8_rows(self, name: str, e: Entry, start: int, stop: int) -> np.ndarray:
        """Dequantize from the block row containing `start`, so the scales line up with the rows read."""
        scale_name = name + "_scale_inv"
        if scale_name not in self.entries:
            raise CheckpointError(f"{self.src}: FP8 tensor {name} has no {scale_name}")
        bh = self.block[0]
        if len(e.shape) != 2 or len(self.block) != 2:
            raise CheckpointError(f"{name}: only 2-D FP8 weights with 2-D blocks are supported")
        expect = tuple(-(-d // b) for d, b in zip(e.shape, self.block))
        if self.shape(scale_name) != expect:
            raise CheckpointError(f"{scale_name}: shape {list(self.shape(scale_name))}, expected {list(expect)} for {name} {list(e.shape)}")
        first = start - start % bh
        raw = self._raw_rows(e, first, stop)
        scale = self.rows(scale_name)[first // bh : -(-stop // bh)]
        out = np.empty(raw.shape, dtype=np.float32)
        try:
            dequantize_fp8_rows(raw, np.ascontiguousarray(scale), 0, out, self.block)
        except ValueError as err:
            raise CheckpointError(f"{name}: {err}") from None
        return out[start - first :]


def _pread(path: Path, offset: int, n: int) -> np.ndarray:
    buf = np.empty(n, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = os.preadv(fd, [buf], offset) if n else 0
    finally:
        os.close(fd)
    if got != n:
        raise CheckpointError(f"{path}: short read at offset {offset}")
    return buf
