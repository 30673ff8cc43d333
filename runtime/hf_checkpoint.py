"""Read a Hugging Face checkpoint folder without holding it in memory.

Safetensors files are parsed from their JSON headers; tensor bytes are read on demand with
positioned reads (not mmap), so what the converter has in memory is only what it is working on.
FP8 weights (float8_e4m3fn + `<name>_scale_inv` per 128x128 block) come back dequantized to float32.
"""

from __future__ import annotations

import json
import math
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
        header = _json(f.read(n), path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    entries = {name: _entry_of(path, name, info, 8 + n, size) for name, info in header.items() if name != "__metadata__"}
    _check_overlaps(path, entries)
    return entries


def _json(raw: bytes | str, path: Path, what: str):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: bad JSON in {what} ({reason})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry_of(path: Path, name: str, info, data_start: int, size: int) -> Entry:
    """One header entry, every field checked: sizes are Python ints, so nothing can wrap."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise CheckpointError(f"{path}: tensor {name} has no dtype string in the header")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name} has an invalid shape {shape!r:.60}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name} has invalid data_offsets {offsets!r:.60}")
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{path}: tensor {name} has data_offsets out of order ({begin} > {end})")
    entry = Entry(path, info["dtype"], tuple(shape), data_start + begin, end - begin)
    if entry.dtype in DTYPES and entry.nbytes != math.prod(shape) * np.dtype(DTYPES[entry.dtype]).itemsize:
        raise CheckpointError(f"{path}: tensor {name} has {entry.nbytes} bytes for shape {tuple(shape)}")
    if entry.offset + entry.nbytes > size:
        raise CheckpointError(f"{path}: tensor {name} lies past the end of the file (truncated download?)")
    return entry


def _check_overlaps(path: Path, entries: dict[str, Entry]) -> None:
    """Two tensors sharing bytes means a corrupt header. Unused bytes between tensors are harmless
    to us (the safetensors library refuses them too, but a dropped entry leaves exactly that)."""
    end, prev = 0, None
    for name, e in sorted(entries.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if e.offset < end:
            raise CheckpointError(f"{path}: data_offsets of tensor {name} overlap those of {prev}")
        end, prev = e.offset + e.nbytes, name


def _weight_map(index: Path) -> dict[str, str]:
    doc = _json(index.read_bytes(), index, "the index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no weight_map of tensor name -> shard file")
    return weight_map


def _shard_files(src: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files, and the index's weight map when the checkpoint is sharded."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if Path(f).name != f or f in (".", "..")]
        if bad:
            raise CheckpointError(f"{index}: shard {bad[0]!r} is not a file name in the checkpoint folder")
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise CheckpointError(f"{src}: missing shard {missing[0]} listed in {index.name}")
        return [src / f for f in files], weight_map
    if (src / "model.safetensors").exists():
        return [src / "model.safetensors"], None
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")


def _load_entries(src: Path) -> dict[str, Entry]:
    files, weight_map = _shard_files(src)
    entries: dict[str, Entry] = {}
    for path in files:
        for name, entry in _read_header(path).items():
            if name in entries:
                raise CheckpointError(f"{src}: tensor {name} is in both {entries[name].path.name} and {path.name}")
            entries[name] = entry
    for name, shard in (weight_map or {}).items():
        found = entries[name].path.name if name in entries else "no shard"
        if found != shard:
            raise CheckpointError(f"{src}/model.safetensors.index.json: tensor {name} is listed in {shard} but found in {found}")
    return entries


def _fp8_block(config: dict, path: Path) -> tuple[int, int]:
    qc = config.get("quantization_config") or {}
    block = qc.get("weight_block_size", [128, 128]) if isinstance(qc, dict) else None
    if not (isinstance(block, list) and len(block) == 2 and all(_is_int(b) and b > 0 for b in block)):
        raise CheckpointError(f"{path}: quantization_config.weight_block_size must be two positive integers")
    return tuple(block)


# config.json fields the converter reads, with the smallest value that makes sense. Sizes must fit
# the UINT32 GGUF keys they become. A null optional field counts as absent (HF writes q_lora_rank: null).
SIZE_MAX = (1 << 32) - 1
REQUIRED_INTS = {"hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "kv_lora_rank": 1,
                 "qk_nope_head_dim": 1, "qk_rope_head_dim": 2, "v_head_dim": 1, "vocab_size": 1,
                 "max_position_embeddings": 1, "intermediate_size": 1}  # fmt: skip
OPTIONAL_INTS = {"q_lora_rank": 0, "n_routed_experts": 0, "n_shared_experts": 0, "first_k_dense_replace": 0,
                 "num_nextn_predict_layers": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 1,
                 "n_group": 1, "topk_group": 1, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
OPTIONAL_REALS = {"rms_norm_eps": (1e-30, 1.0), "rope_theta": (1.000001, 1e12), "routed_scaling_factor": (0.0, 1e6)}
OPTIONAL_BOOLS = ("tie_word_embeddings", "norm_topk_prob")


def check_config(config, path: Path) -> None:
    """Types and ranges of every config.json field the converter uses, and their consistency."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    archs = config.get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{path}: architectures must be a non-empty list of names")
    for key, lo in REQUIRED_INTS.items():
        _number(config, key, lo, path, required=True, integer=True)
    for key, lo in OPTIONAL_INTS.items():
        _number(config, key, lo, path, integer=True)
    for key, (lo, hi) in OPTIONAL_REALS.items():
        _number(config, key, lo, path, hi=hi)
    for key in OPTIONAL_BOOLS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise CheckpointError(f"{path}: field {key} must be true or false, got {config[key]!r:.40}")
    _check_consistency(config, path)
    _check_rope_scaling(config, path)


def _number(config: dict, key: str, lo, path: Path, required=False, integer=False, hi=SIZE_MAX, within=""):
    v = config.get(key)
    key = within + key
    if v is None:
        if required:
            raise CheckpointError(f"{path}: missing field {key}")
        return
    kind = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or not (lo <= v <= hi):  # NaN fails lo <= v
        what = "an integer" if integer else "a number"
        raise CheckpointError(f"{path}: field {key} must be {what} in {lo}..{hi}, got {v!r:.40}")


def _check_consistency(c: dict, path: Path) -> None:
    problems = []
    if c["qk_rope_head_dim"] % 2:
        problems.append(f"qk_rope_head_dim {c['qk_rope_head_dim']} is odd (rope turns pairs)")
    for key in ("bos_token_id", "eos_token_id"):
        if (c.get(key) or 0) >= c["vocab_size"]:
            problems.append(f"{key} {c[key]} is not below vocab_size {c['vocab_size']}")
    E = c.get("n_routed_experts") or 0
    if E:
        k, groups, used = c.get("num_experts_per_tok"), c.get("n_group") or 1, c.get("topk_group") or 1
        if k is None or k > E:
            problems.append(f"num_experts_per_tok {k} must be in 1..n_routed_experts {E}")
        if c.get("moe_intermediate_size") is None:
            problems.append("moe_intermediate_size is missing")
        if E % groups or used > groups:
            problems.append(f"n_group {groups} must divide n_routed_experts {E} and be >= topk_group {used}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def _check_rope_scaling(c: dict, path: Path) -> None:
    rs = c.get("rope_scaling") or c.get("rope_parameters")
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise CheckpointError(f"{path}: rope_scaling must be an object, got {rs!r:.40}")
    if (rs.get("type") or rs.get("rope_type")) != "yarn":
        return  # "default" is fine; anything else is refused by name in convert_meta
    _number(rs, "factor", 1.0, path, required=True, hi=1e6, within="rope_scaling.")
    _number(rs, "original_max_position_embeddings", 1, path, required=True, integer=True, within="rope_scaling.")
    for key in ("mscale_all_dim", "beta_fast", "beta_slow"):
        _number(rs, key, 0.0, path, hi=1e6, within="rope_scaling.")


class Checkpoint:
    """config: the parsed config.json; names(): all tensor names; rows(name, start, stop) -> float32."""

    def __init__(self, src: str | Path):
        self.src = Path(src)
        if not self.src.is_dir():
            raise CheckpointError(f"{self.src}: not a directory")
        config_path = self.src / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{self.src}: missing config.json")
        self.config = _json(config_path.read_bytes(), config_path, "config.json")
        check_config(self.config, config_path)
        self.entries = _load_entries(self.src)
        self.block = _fp8_block(self.config, config_path)

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
            out = self._fp8_rows(name, e, start, stop)
        else:
            raw = self._raw_rows(e, start, stop)
            out = widen_bf16(raw) if e.dtype == "BF16" else raw.astype(np.float32, copy=False)
        _check_finite(e.path, name, out, start)
        return out

    def _raw_rows(self, e: Entry, start: int, stop: int) -> np.ndarray:
        dtype = np.dtype(DTYPES[e.dtype])
        row = math.prod(e.shape[1:]) * dtype.itemsize
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


def _check_finite(path: Path, name: str, x: np.ndarray, start: int) -> None:
    """NaN/Inf weights would poison every token; one float32 sum per chunk is the cheap test (it can
    only err towards a false alarm on overflow, which the exact scan then clears)."""
    if np.isfinite(x.sum()):
        return
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        where = [start + int(bad[0][0])] + [int(i) for i in bad[0][1:]]
        raise CheckpointError(f"{path}: tensor {name} holds a non-finite value ({x[tuple(bad[0])]}) at index {where}")


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
