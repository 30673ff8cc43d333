"""Hostile inputs, one case each, with the one-line error each must give.

GGUF files are built by hand (struct) for the container cases, or rewritten from a converted tiny
model for metadata cases; checkpoints are broken copies of the tiny test checkpoints. Every error
must be one of ours, one line, and name the file. `python tests/test_hardening.py` prints the table
of cases and messages (paths shortened) for the record.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from r1cpu.runtime.config import ConfigError
from r1cpu.runtime.convert import convert
from r1cpu.runtime.gguf_reader import ARRAY, BOOL, SCALARS, STRING, UINT32, GGUFError, GGUFFile
from r1cpu.runtime.gguf_writer import GGUFWriter
from r1cpu.runtime.guards import NumericalError
from r1cpu.runtime.hf_checkpoint import CheckpointError

U8, I32, F32T, U64 = 0, 5, 6, 10

# --- GGUF bytes by hand ------------------------------------------------------------------------


def s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def info(name, ne, qtype: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(ne)}q", len(ne), *ne) + struct.pack("<IQ", qtype, offset)


ARCH = kv("general.architecture", STRING, s("deepseek2"))
ONE_TENSOR = [info("a", [32])]  # F32, 128 bytes at offset 0


def gguf(kvs=(ARCH,), infos=ONE_TENSOR, data=bytes(128), counts=None, version=3, magic=b"GGUF") -> bytes:
    n_tensors, n_kv = counts or (len(infos), len(kvs))
    head = magic + struct.pack("<Iqq", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data


def gguf_case(raw: bytes) -> Callable[[Path], None]:
    def run(tmp: Path):
        path = tmp / "bad.gguf"
        path.write_bytes(raw)
        GGUFFile(path)

    return run


# --- metadata rewrites of a converted tiny model -----------------------------------------------

_DTYPE_TYPE = {np.dtype(dtype): t for t, (_, dtype) in SCALARS.items()}


def rewrite(src: Path, dst: Path, changes: dict, alignment: int = 32) -> Path:
    """Copy a GGUF, replacing metadata: key -> (value, gguf type), or None to drop the key."""
    g = GGUFFile(src)
    w = GGUFWriter(alignment)
    for key, value in g.kv.items():
        vtype = g.types[key]
        if vtype == ARRAY:
            w.add_array(key, value, STRING if isinstance(value, list) else _DTYPE_TYPE[value.dtype])
        else:
            w.add(key, value, vtype)
    for key, change in changes.items():
        w.kv.pop(key, None)
        if change is not None and change[1] == ARRAY:
            w.add_array(key, change[0], change[2])
        elif change is not None:
            w.add(key, *change)
    for t in g.tensors.values():
        w.add_tensor_info(t.name, t.shape, t.qtype)
    with open(dst, "wb") as f:
        w.write_header(f)
        for t in g.tensors.values():
            w.write_data(f, np.asarray(t.data))
    return dst


def poke_tensor(src: Path, dst: Path, name: str, value: bytes) -> Path:
    """Copy a GGUF with the first bytes of a tensor's data replaced."""
    g = GGUFFile(src)
    start = g.data_offset + (g.tensors[name].data.ctypes.data - g.mmap[g.data_offset :].ctypes.data)
    raw = bytearray(src.read_bytes())
    raw[start : start + len(value)] = value
    dst.write_bytes(bytes(raw))
    return dst


def load_case(changes: dict) -> Callable[[Path], None]:
    def run(tmp: Path):
        from r1cpu import load

        load(rewrite(TINY["q8_0"], tmp / "bad.gguf", changes)).logits([1, 2])

    return run


def nan_weight_case(tmp: Path):
    from r1cpu import load

    path = poke_tensor(TINY["f16"], tmp / "bad.gguf", "blk.1.attn_output.weight", b"\xff\x7f")
    load(path).logits([1, 2])


# --- broken checkpoints ------------------------------------------------------------------------


def checkpoint_case(breakage: Callable[[Path], None], preset: str = "tiny-v3") -> Callable[[Path], None]:
    def run(tmp: Path):
        src = tmp / "src"
        shutil.copytree(CHECKPOINTS[preset], src)
        breakage(src)
        try:
            convert(src, tmp / "out.gguf", "q8_0")
        finally:
            assert not list(tmp.glob("*.gguf")) and not list(tmp.glob(".*.tmp"))  # nothing left behind

    return run


def edit_config(**changes):
    def edit(src: Path):
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(changes)
        (src / "config.json").write_text(json.dumps(cfg))

    return edit


def first_shard(src: Path) -> Path:
    return sorted(src.glob("*.safetensors"))[0]


def edit_header(edit: Callable[[dict], None], shard: Callable[[Path], Path] = first_shard):
    """Rewrite a shard's JSON header in place (the data section is kept byte for byte)."""

    def run(src: Path):
        path = shard(src)
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        edit(header)
        new = json.dumps(header, separators=(",", ":")).encode()
        assert len(new) <= n, "the edit must not grow the header"
        path.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n :])

    return run


def tensors_of(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def set_offsets(which: int, offsets):
    return edit_header(lambda h: h[tensors_of(h)[which]].update(data_offsets=offsets(h, tensors_of(h))))


def poke_data(name: str, value: bytes):
    """Overwrite the first bytes of one tensor's data in whichever shard holds it."""

    def run(src: Path):
        for path in src.glob("*.safetensors"):
            raw = bytearray(path.read_bytes())
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8 : 8 + n])
            if name in header:
                start = 8 + n + header[name]["data_offsets"][0]
                raw[start : start + len(value)] = value
                path.write_bytes(bytes(raw))
                return
        raise KeyError(name)

    return run


def edit_index(edit: Callable[[dict], None]):
    def run(src: Path):
        index = src / "model.safetensors.index.json"
        doc = json.loads(index.read_text())
        edit(doc)
        index.write_text(json.dumps(doc))

    return run


def duplicate_into_second_shard(src: Path):
    """Give the second shard's first tensor the name of a tensor the first shard holds."""
    a, b = sorted(src.glob("*.safetensors"))
    taken = tensors_of(json.loads(a.read_bytes()[8 : 8 + int.from_bytes(a.read_bytes()[:8], "little")]))[0]
    edit_header(lambda h: h.__setitem__(taken, h.pop(tensors_of(h)[0])), lambda _: b)(src)


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], None]
    error: type
    pattern: str


BIG = 1 << 40
NESTED = kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U8, 0))
CASES = [
    # container
    Case("empty file", gguf_case(b""), GGUFError, "cannot map file"),
    Case("bad magic", gguf_case(gguf(magic=b"GGML")), GGUFError, "bad magic"),
    Case("version 1", gguf_case(gguf(version=1)), GGUFError, "unsupported GGUF version 1"),
    Case("big-endian file", gguf_case(gguf(version=3 << 24)), GGUFError, r"version 50331648 \(expected 3, the file looks big-endian\)"),
    Case("negative tensor count", gguf_case(gguf(counts=(-1, 1))), GGUFError, "negative counts: -1 tensors, 1 metadata keys"),
    Case("2^62 metadata keys", gguf_case(gguf(counts=(1, 1 << 62))), GGUFError, "impossible counts"),
    Case("key length 2^63", gguf_case(gguf(kvs=[struct.pack("<Q", 1 << 63)])), GGUFError, "truncated file: metadata key needs 9223372036854775808 bytes"),
    Case("string array of 2^40 elements", gguf_case(gguf(kvs=[kv("x", ARRAY, struct.pack("<IQ", STRING, BIG))])), GGUFError, "array x claims 1099511627776 strings"),
    Case("u64 array of 2^40 elements", gguf_case(gguf(kvs=[kv("x", ARRAY, struct.pack("<IQ", U64, BIG))])), GGUFError, "array x of 1099511627776 elements needs 8796093022208 bytes"),
    Case("nested array", gguf_case(gguf(kvs=[NESTED])), GGUFError, "array x holds arrays"),
    Case("bool value 2", gguf_case(gguf(kvs=[kv("x", BOOL, b"\x02")])), GGUFError, "value of x is a bool stored as 2"),
    Case("bool array with 3", gguf_case(gguf(kvs=[kv("x", ARRAY, struct.pack("<IQ", BOOL, 2) + b"\x01\x03")])), GGUFError, "array x holds a bool other than 0 or 1"),
    Case("unknown value type", gguf_case(gguf(kvs=[kv("x", 13, b"")])), GGUFError, "key x has unknown value type 13"),
    Case("unknown array element type", gguf_case(gguf(kvs=[kv("x", ARRAY, struct.pack("<IQ", 99, 0))])), GGUFError, "array x has unsupported element type 99"),
    Case("key not UTF-8", gguf_case(gguf(kvs=[kv(b"\xff\xfe", U8, b"\x00")])), GGUFError, "metadata key at offset 32 is not valid UTF-8"),
    Case("key with a newline", gguf_case(gguf(kvs=[kv("a\nb", 13, b"")])), GGUFError, r"key a\\nb has unknown value type 13"),
    Case("duplicate key", gguf_case(gguf(kvs=[ARCH, ARCH])), GGUFError, "duplicate metadata key general.architecture"),
    Case("tensor name of 64 bytes", gguf_case(gguf(infos=[info("n" * 64, [32])])), GGUFError, "tensor name at offset .* is 64 bytes long \\(at most 63"),
    Case("n_dims 0", gguf_case(gguf(infos=[info("a", [])])), GGUFError, "tensor a has 0 dimensions"),
    Case("n_dims 5", gguf_case(gguf(infos=[info("a", [32, 1, 1, 1, 1])])), GGUFError, "tensor a has 5 dimensions"),
    Case("negative dim", gguf_case(gguf(infos=[info("a", [32, -1])])), GGUFError, r"tensor a has invalid dimensions \[32, -1\]"),
    Case("dims overflowing int64", gguf_case(gguf(infos=[info("a", [BIG, BIG, BIG, BIG])])), GGUFError, "tensor a: data at offset 0 .* lies outside the file"),
    Case("unsupported tensor type", gguf_case(gguf(infos=[info("a", [32], 77)])), GGUFError, "tensor a has unsupported type 77"),
    Case("row not a multiple of the block", gguf_case(gguf(infos=[info("a", [33], 8)])), GGUFError, "row length 33 is not a multiple of Q8_0's block size 32"),
    Case("misaligned offset", gguf_case(gguf(infos=[info("a", [32], 0, 4)])), GGUFError, "tensor a: data offset 4 is misaligned"),
    Case("offset leaving a gap", gguf_case(gguf(infos=[info("a", [32], 0, 32)], data=bytes(256))), GGUFError, "tensor a: data offset 32, expected 0"),
    Case("overlapping tensors", gguf_case(gguf(infos=[info("a", [32]), info("b", [32])], data=bytes(256))), GGUFError, "tensor b: data offset 0, expected 128"),
    Case("data past the end", gguf_case(gguf(data=bytes(64))), GGUFError, r"tensor a: data at offset 0 \(\+128 bytes\) lies outside the file"),
    Case("duplicate tensor", gguf_case(gguf(infos=[info("a", [32]), info("a", [32], 0, 128)], data=bytes(256))), GGUFError, "duplicate tensor name a"),
    Case("alignment as a string", gguf_case(gguf(kvs=[kv("general.alignment", STRING, s("32"))])), GGUFError, "general.alignment '32' is not a UINT32 power of two"),
    Case("alignment 48", gguf_case(gguf(kvs=[kv("general.alignment", UINT32, struct.pack("<I", 48))])), GGUFError, "general.alignment 48 is not"),
    Case("alignment as a bool", gguf_case(gguf(kvs=[kv("general.alignment", BOOL, b"\x01")])), GGUFError, "general.alignment True is not"),
    # metadata the runtime reads
    Case("architecture llama", load_case({"general.architecture": ("llama", STRING)}), ConfigError, "unsupported architecture 'llama' \\(expected 'deepseek2'\\)"),
    Case("block_count as a string", load_case({"deepseek2.block_count": ("3", STRING)}), ConfigError, "deepseek2.block_count: expected an integer, got str '3'"),
    Case("block_count 0", load_case({"deepseek2.block_count": (0, UINT32)}), ConfigError, "deepseek2.block_count: 0 is out of range 1..4294967295"),
    Case("embedding_length missing", load_case({"deepseek2.embedding_length": None}), ConfigError, "missing metadata key deepseek2.embedding_length"),
    Case("head_count as a float", load_case({"deepseek2.attention.head_count": (4.0, F32T)}), ConfigError, "deepseek2.attention.head_count: expected an integer, got float 4.0"),
    Case("rms epsilon NaN", load_case({"deepseek2.attention.layer_norm_rms_epsilon": (math.nan, F32T)}), ConfigError, "layer_norm_rms_epsilon: nan is out of range"),
    Case("odd rope dimension", load_case({"deepseek2.rope.dimension_count": (15, UINT32)}), ConfigError, "rope.dimension_count 15 is odd"),
    Case("key_length_mla <= rope", load_case({"deepseek2.attention.key_length_mla": (16, UINT32)}), ConfigError, "key_length\\(_mla\\) must exceed rope.dimension_count 16"),
    Case("rope scaling factor 1e38", load_case({"deepseek2.rope.scaling.factor": (1e38, F32T)}), ConfigError, r"deepseek2.rope.scaling.factor: 9.99.*e\+37 is out of range 0.0..1000000.0"),
    Case("rope scaling factor 1e-40", load_case({"deepseek2.rope.scaling.factor": (1e-40, F32T)}), ConfigError, r"deepseek2.rope.scaling.factor: 9.99.*e-41 is below 1 \(0 means unset\)"),
    Case("rope scaling linear", load_case({"deepseek2.rope.scaling.type": ("linear", STRING)}), ConfigError, "rope.scaling.type: unsupported value 'linear'"),
    Case("expert_used_count > expert_count", load_case({"deepseek2.expert_used_count": (9, UINT32)}), ConfigError, "expert_used_count 9 not in 1..expert_count 8$"),
    Case("group count not dividing experts", load_case({"deepseek2.expert_group_count": (3, UINT32)}), ConfigError, "expert_group_count 3 does not divide expert_count 8"),
    Case("group_used > group count", load_case({"deepseek2.expert_group_used_count": (3, UINT32)}), ConfigError, "expert_group_used_count 3 exceeds expert_group_count 2"),
    Case("gating function 7", load_case({"deepseek2.expert_gating_func": (7, UINT32)}), ConfigError, "expert_gating_func: 7 is out of range 0..2"),
    Case("expert_weights_norm as u8", load_case({"deepseek2.expert_weights_norm": (1, U8)}), ConfigError, "expert_weights_norm: expected a bool, got int 1"),
    Case("dense blocks without feed_forward_length", load_case({"deepseek2.feed_forward_length": (0, UINT32)}), ConfigError, "feed_forward_length must be positive"),
    Case("tokens as integers", load_case({"tokenizer.ggml.tokens": ([1, 2], ARRAY, I32)}), ConfigError, "tokenizer.ggml.tokens: expected a non-empty array of strings, got an array of 2"),
    Case("bos id past the vocabulary", load_case({"tokenizer.ggml.bos_token_id": (5000, UINT32)}), ConfigError, "bos_token_id: 5000 is out of range 0..1023"),
    Case("tensor missing for the config", load_case({"deepseek2.block_count": (4, UINT32), "deepseek2.nextn_predict_layers": None}), GGUFError, r"missing tensor blk\.3\."),
    Case("NaN weight", nan_weight_case, NumericalError, "logits contain NaN at positions 0..1; the first non-finite values appear in layer 1 attention"),
    # checkpoints
    Case("config.json not JSON", checkpoint_case(lambda s: (s / "config.json").write_text("{'hidden_size': 64")), CheckpointError, "config.json: bad JSON in config.json"),
    Case("config.json a list", checkpoint_case(lambda s: (s / "config.json").write_text("[1, 2]")), CheckpointError, "config.json: not a JSON object"),
    Case("hidden_size as a string", checkpoint_case(edit_config(hidden_size="64")), CheckpointError, "field hidden_size must be an integer in 1..4294967295, got '64'"),
    Case("vocab_size 2^40", checkpoint_case(edit_config(vocab_size=BIG)), CheckpointError, "field vocab_size must be an integer"),
    Case("rms_norm_eps NaN", checkpoint_case(edit_config(rms_norm_eps=math.nan)), CheckpointError, r"field rms_norm_eps must be a number in 1e-30\.\.1\.0, got nan"),
    Case("experts per token > experts", checkpoint_case(edit_config(num_experts_per_tok=9)), CheckpointError, "num_experts_per_tok 9 must be in 1..n_routed_experts 8"),
    Case("rope_scaling factor missing", checkpoint_case(edit_config(rope_scaling={"type": "yarn"})), CheckpointError, "missing field rope_scaling.factor"),
    Case("architectures a string", checkpoint_case(edit_config(architectures="DeepseekV3ForCausalLM")), CheckpointError, "architectures must be a non-empty list"),
    Case("safetensors header not JSON", checkpoint_case(lambda s: first_shard(s).write_bytes(struct.pack("<Q", 4) + b"{{{{")), CheckpointError, "bad JSON in safetensors header"),
    Case("safetensors header length 2^63", checkpoint_case(lambda s: first_shard(s).write_bytes(struct.pack("<Q", 1 << 63) + b"{}")), CheckpointError, "safetensors header length 9223372036854775808 is impossible"),
    Case("safetensors header nested 100k deep", checkpoint_case(lambda s: first_shard(s).write_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)), CheckpointError, "bad JSON in safetensors header \\(RecursionError|bad JSON in safetensors header \\(maximum recursion"),
    Case("negative shape", checkpoint_case(edit_header(lambda h: h[tensors_of(h)[0]].update(shape=[-1, 64]))), CheckpointError, "has an invalid shape \\[-1, 64\\]"),
    Case("data_offsets reversed", checkpoint_case(set_offsets(0, lambda h, t: h[t[0]]["data_offsets"][::-1])), CheckpointError, "data_offsets out of order"),
    Case("data_offsets overlapping", checkpoint_case(set_offsets(1, lambda h, t: [o - 2 for o in h[t[1]]["data_offsets"]])), CheckpointError, "data_offsets of tensor .* overlap those of"),
    Case("data_offsets past the end", checkpoint_case(set_offsets(-1, lambda h, t: [o + 100_000 for o in h[t[-1]]["data_offsets"]])), CheckpointError, "lies past the end of the file"),
    Case("bytes not matching the shape", checkpoint_case(edit_header(lambda h: h[tensors_of(h)[0]].update(shape=[3]))), CheckpointError, "bytes for shape \\(3,\\)"),
    Case("tensor in two shards", checkpoint_case(duplicate_into_second_shard), CheckpointError, "is in both model-00001-of-00002.safetensors and model-00002-of-00002.safetensors"),
    Case("index pointing at the wrong shard", checkpoint_case(edit_index(lambda d: d["weight_map"].update({"model.norm.weight": "model-00001-of-00002.safetensors"}))), CheckpointError, "tensor model.norm.weight is listed in model-00001-of-00002.safetensors but found in model-00002"),
    Case("index escaping the folder", checkpoint_case(edit_index(lambda d: d["weight_map"].update({"model.norm.weight": "../config.json"}))), CheckpointError, "shard '../config.json' is not a file name"),
    Case("index without weight_map", checkpoint_case(edit_index(lambda d: d.pop("weight_map"))), CheckpointError, "no weight_map"),
    Case("NaN in a BF16 weight", checkpoint_case(poke_data("model.layers.1.mlp.experts.5.up_proj.weight", b"\xc0\x7f"), "tiny-moonlight"), CheckpointError, r"tensor model.layers.1.mlp.experts.5.up_proj.weight holds a non-finite value \(nan\) at index \[0, 0\]"),
    Case("Inf in an FP8 scale", checkpoint_case(poke_data("model.layers.0.self_attn.q_a_proj.weight_scale_inv", struct.pack("<f", math.inf)), "tiny-v3-fp8"), CheckpointError, r"tensor model.layers.0.self_attn.q_a_proj.weight_scale_inv holds a non-finite value \(inf\)"),
]  # fmt: skip

TINY: dict[str, Path] = {}  # out_type -> converted tiny-v3 file
CHECKPOINTS: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def inputs(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    CHECKPOINTS.update(checkpoints)
    for t in ("q8_0", "f16"):
        TINY[t] = convert(checkpoints["tiny-v3"], root / f"tiny-v3.{t}.gguf", t).path


def outcome(c: Case, tmp: Path) -> BaseException:
    with pytest.raises(c.error) as info:
        c.run(tmp)
    return info.value


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_error(c, tmp_path):
    err = outcome(c, tmp_path)
    msg = str(err)
    assert type(err) is c.error, f"{type(err).__name__}: {msg}"
    assert re.search(c.pattern, msg), msg
    assert "\n" not in msg and str(tmp_path) in msg


def test_huge_string_array_is_refused_before_allocating(tmp_path):
    """2^40 strings claimed in a 100-byte file: refused from the header, no allocation, no loop."""
    path = tmp_path / "huge.gguf"
    path.write_bytes(gguf(kvs=[kv("x", ARRAY, struct.pack("<IQ", STRING, BIG))]))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match="claims 1099511627776 strings"):
        GGUFFile(path)
    assert time.perf_counter() - t0 < 0.5
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_guard_replay_follows_forward():
    """guards.replay must make the same calls as Model.forward, or it would blame the wrong stage."""
    from r1cpu import load
    from r1cpu.runtime import guards
    from r1cpu.runtime.norm import rmsnorm
    from r1cpu.runtime.weights import linear

    model = load(TINY["q8_0"])
    ids = np.array([1, 5, 9])
    *_, (stage, h) = guards.replay(model, ids, model.new_cache(8), "absorbed")
    w = model.weights
    logits = linear(rmsnorm(h, w.output_norm, model.config.rms_eps), w.output)
    np.testing.assert_array_equal(logits, model.forward(ids, model.new_cache(8), form="absorbed"))
    assert stage == f"layer {model.config.n_layer - 1} feed-forward (blk.{model.config.n_layer - 1}.ffn_*)"


def test_guard_blames_the_first_bad_layer(tmp_path):
    """NaN in layer 2's FFN norm: layers 0-1 and layer 2's attention are clean."""
    from r1cpu import load

    path = poke_tensor(TINY["q8_0"], tmp_path / "nan.gguf", "blk.2.ffn_norm.weight", struct.pack("<f", math.nan))
    with pytest.raises(NumericalError, match="appear in layer 2 feed-forward"):
        load(path).session().prefill([3, 4])


def test_alignment_1_gives_unaligned_views_and_the_same_logits(tmp_path):
    """llama.cpp allows any power-of-two alignment: float32 data at odd addresses must still work."""
    from r1cpu import load

    path = rewrite(TINY["q8_0"], tmp_path / "align1.gguf", {}, alignment=1)
    assert not all(t.data.flags.aligned for t in GGUFFile(path).tensors.values())
    ids = [1, 2, 3]
    np.testing.assert_array_equal(load(path).logits(ids), load(TINY["q8_0"]).logits(ids))


def test_finiteness_check_has_no_false_alarm_on_huge_logits():
    from r1cpu.runtime import guards

    x = np.full((2, 3), 3e38, dtype=np.float32)  # a float32 sum would overflow; the check must not
    assert guards.all_finite(x) and not guards.all_finite(np.array([1.0, np.inf], dtype=np.float32))


def table(tmp: Path) -> str:
    rows = ["| case | error | message |", "|---|---|---|"]
    for i, c in enumerate(CASES):
        folder = tmp / f"case{i}"
        folder.mkdir()
        try:
            c.run(folder)
            rows.append(f"| {c.id} | (none) | loaded without error |")
        except Exception as e:  # noqa: BLE001 -- the table shows whatever happens
            msg = str(e).replace(str(folder), "…")
            rows.append(f"| {c.id} | {type(e).__name__} | `{msg}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    from r1cpu.tools.make_checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        CHECKPOINTS.update({p: make_checkpoint(p, root / p) for p in ("tiny-v3", "tiny-v3-fp8", "tiny-moonlight")})
        for t in ("q8_0", "f16"):
            TINY[t] = convert(CHECKPOINTS["tiny-v3"], root / f"tiny-v3.{t}.gguf", t).path
        (root / "cases").mkdir()
        print(table(root / "cases"))
        sys.exit(0)
