"""GGUF writer/reader round trip, checked against gguf-py's GGUFReader, and malformed headers."""

import struct

import gguf
import numpy as np
import pytest

from r1cpu.quant.registry import GGMLType, quantize
from r1cpu.runtime.gguf_reader import STRING, GGUFError, GGUFFile
from r1cpu.runtime.gguf_writer import BOOL, FLOAT32, INT32, UINT32, GGUFWriter

RNG = np.random.default_rng(0)
TENSORS = {  # name -> (type, float32 data in numpy order)
    "a.weight": (GGMLType.F32, RNG.standard_normal((3, 5)).astype(np.float32)),
    "b.weight": (GGMLType.F16, RNG.standard_normal((4, 6)).astype(np.float32)),
    "c.weight": (GGMLType.Q8_0, RNG.standard_normal((2, 3, 64)).astype(np.float32)),
    "d.bias": (GGMLType.F32, RNG.standard_normal(7).astype(np.float32)),
}


def write_file(path, tensors=TENSORS, chunked=True):
    w = GGUFWriter()
    w.add("general.architecture", "deepseek2", STRING)
    w.add("x.u32", 7, UINT32)
    w.add("x.f32", 0.5, FLOAT32)
    w.add("x.flag", True, BOOL)
    w.add_array("x.ints", [1, -2, 3], INT32)
    w.add_array("x.strings", ["a", "ü", ""], STRING)
    for name, (qtype, data) in tensors.items():
        w.add_tensor_info(name, data.shape, qtype)
    with open(path, "wb") as f:
        w.write_header(f)
        for qtype, data in tensors.values():
            raw = quantize(data.reshape(-1, data.shape[-1]), qtype)
            for row in raw if chunked else [raw]:  # streaming row by row must give the same file
                w.write_data(f, row)
        w.finish()
    return path


def test_gguf_py_reads_our_file(tmp_path):
    path = write_file(tmp_path / "t.gguf")
    r = gguf.GGUFReader(path)
    assert r.fields["x.u32"].parts[-1][0] == 7
    assert r.fields["x.u32"].types == [gguf.GGUFValueType.UINT32]
    assert r.fields["x.ints"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert r.fields["x.flag"].types == [gguf.GGUFValueType.BOOL]
    for t in r.tensors:
        qtype, data = TENSORS[t.name]
        assert t.tensor_type == int(qtype)
        assert list(t.shape) == list(reversed(data.shape))
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(data.shape)
        expect = gguf.quants.dequantize(quantize(data, qtype), qtype).reshape(data.shape)
        np.testing.assert_array_equal(got, expect)


def test_our_reader_round_trip(tmp_path):
    path = write_file(tmp_path / "t.gguf")
    g = GGUFFile(path)
    assert g.kv["x.u32"] == 7 and g.kv["x.flag"] is True and g.kv["x.f32"] == 0.5
    assert list(g.kv["x.ints"]) == [1, -2, 3] and g.kv["x.strings"] == ["a", "ü", ""]
    ref = gguf.GGUFReader(path)
    for t in ref.tensors:
        ours = g.tensors[t.name]
        assert ours.shape == TENSORS[t.name][1].shape
        np.testing.assert_array_equal(ours.data.reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8))
        assert not ours.data.flags.writeable  # a view into the read-only map, not a copy


def test_streamed_and_whole_writes_are_identical(tmp_path):
    a = write_file(tmp_path / "a.gguf", chunked=True).read_bytes()
    b = write_file(tmp_path / "b.gguf", chunked=False).read_bytes()
    assert a == b


def _corrupt(tmp_path, edit):
    raw = bytearray(write_file(tmp_path / "ok.gguf").read_bytes())
    raw = edit(raw)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    return bad


def _tensor_info_pos(raw, name):
    return bytes(raw).index(name.encode()) + len(name)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r[:300], "truncated file"),
        (lambda r: r[:100], r"impossible counts: 4 tensors and 6 metadata keys .* \(truncated\?\)"),
        (lambda r: b"GGUX" + r[4:], "bad magic"),
        (lambda r: r[:4] + struct.pack("<I", 9) + r[8:], "unsupported GGUF version 9"),
        (lambda r: r[:8] + struct.pack("<q", 1 << 60) + r[16:], "impossible counts"),
        (lambda r: r[: len(r) - 40], "outside the file"),
    ],
)
def test_malformed_files_give_one_line_errors(tmp_path, edit, message):
    with pytest.raises(GGUFError, match=message) as e:
        GGUFFile(_corrupt(tmp_path, edit))
    assert "\n" not in str(e.value) and "bad.gguf" in str(e.value)


def test_unknown_tensor_type_names_the_tensor(tmp_path):
    def edit(raw):
        pos = _tensor_info_pos(raw, "a.weight") + 4 + 2 * 8  # n_dims + two dims
        raw[pos : pos + 4] = struct.pack("<I", 77)
        return raw

    with pytest.raises(GGUFError, match="tensor a.weight has unsupported type 77"):
        GGUFFile(_corrupt(tmp_path, edit))


def test_duplicate_tensor_names_are_refused(tmp_path):
    def edit(raw):
        pos = bytes(raw).index(b"b.weight")
        raw[pos : pos + 8] = b"a.weight"
        return raw

    with pytest.raises(GGUFError, match="duplicate tensor name a.weight"):
        GGUFFile(_corrupt(tmp_path, edit))


def test_misaligned_offset_is_refused(tmp_path):
    def edit(raw):
        pos = _tensor_info_pos(raw, "b.weight") + 4 + 2 * 8 + 4
        (offset,) = struct.unpack("<Q", raw[pos : pos + 8])
        raw[pos : pos + 8] = struct.pack("<Q", offset + 2)
        return raw

    with pytest.raises(GGUFError, match="b.weight.*misaligned"):
        GGUFFile(_corrupt(tmp_path, edit))
