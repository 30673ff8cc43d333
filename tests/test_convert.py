"""`r1cpu convert`: llama.cpp's deepseek2 layout, exact quantized bytes, FP8, safety and bad input."""

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY_PRESETS
from r1cpu.runtime.cli import main as cli
from r1cpu.runtime.convert import convert
from r1cpu.runtime.hf_checkpoint import CheckpointError

V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """(preset, type) -> path, for every preset in f32, q8_0 and q4_0."""
    root = tmp_path_factory.mktemp("gguf")
    return {(p, t): convert(checkpoints[p], root / f"{p}.{t}.gguf", t).path
            for p in TINY_PRESETS for t in ("f32", "q8_0", "q4_0")}  # fmt: skip


def expected_tensors(cfg):
    """numpy-order shapes of llama.cpp's deepseek2 MLA layout, derived from config.json alone."""
    D, H, C, R = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    N, Vd, QL, E = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["q_lora_rank"], cfg["n_routed_experts"]
    ff, fe, S = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["n_shared_experts"]
    t = {"token_embd.weight": (cfg["vocab_size"], D), "output_norm.weight": (D,), "output.weight": (cfg["vocab_size"], D)}
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        t |= {b + "attn_norm.weight": (D,), b + "ffn_norm.weight": (D,), b + "attn_kv_a_mqa.weight": (C + R, D),
              b + "attn_kv_a_norm.weight": (C,), b + "attn_k_b.weight": (H, C, N), b + "attn_v_b.weight": (H, Vd, C),
              b + "attn_output.weight": (D, H * Vd)}  # fmt: skip
        if QL:
            t |= {b + "attn_q_a.weight": (QL, D), b + "attn_q_a_norm.weight": (QL,), b + "attn_q_b.weight": (H * (N + R), QL)}
        else:
            t |= {b + "attn_q.weight": (H * (N + R), D)}
        if i < cfg["first_k_dense_replace"]:
            t |= {b + "ffn_gate.weight": (ff, D), b + "ffn_up.weight": (ff, D), b + "ffn_down.weight": (D, ff)}
            continue
        t |= {b + "ffn_gate_inp.weight": (E, D), b + "ffn_gate_exps.weight": (E, fe, D), b + "ffn_up_exps.weight": (E, fe, D),
              b + "ffn_down_exps.weight": (E, D, fe), b + "ffn_gate_shexp.weight": (S * fe, D),
              b + "ffn_up_shexp.weight": (S * fe, D), b + "ffn_down_shexp.weight": (D, S * fe)}  # fmt: skip
        if cfg.get("topk_method") == "noaux_tc":
            t[b + "exp_probs_b.bias"] = (E,)
    return t


def field(reader, key):
    f = reader.fields[key]
    return f.types, f.contents()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_gguf_py_reads_expected_layout(converted, checkpoints, preset):
    cfg = json.loads((checkpoints[preset] / "config.json").read_text())
    r = gguf.GGUFReader(converted[preset, "q8_0"])
    got = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}
    assert got == expected_tensors(cfg)  # exact set: llama.cpp refuses extra tensors; no MTP layer
    assert field(r, "general.architecture") == ([V.STRING], "deepseek2")
    assert field(r, "deepseek2.block_count") == ([V.UINT32], cfg["num_hidden_layers"])
    assert field(r, "deepseek2.attention.head_count_kv") == ([V.UINT32], 1)
    assert field(r, "deepseek2.attention.key_length") == ([V.UINT32], cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    assert field(r, "deepseek2.attention.value_length_mla") == ([V.UINT32], cfg["v_head_dim"])
    assert field(r, "deepseek2.attention.q_lora_rank") == ([V.UINT32], cfg["q_lora_rank"] or 0)
    assert field(r, "deepseek2.expert_gating_func") == ([V.UINT32], {"sigmoid": 2, "softmax": 1}[cfg["scoring_func"]])
    assert field(r, "deepseek2.expert_group_count") == ([V.UINT32], cfg["n_group"])
    assert field(r, "deepseek2.expert_weights_norm") == ([V.BOOL], cfg["norm_topk_prob"])
    assert field(r, "general.file_type") == ([V.UINT32], 7)
    assert field(r, "tokenizer.ggml.model") == ([V.STRING], "gpt2")
    assert field(r, "tokenizer.ggml.pre")[1] == ("deepseek-llm" if preset == "tiny-v2" else "deepseek-v3")
    assert r.fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert len(r.fields["tokenizer.ggml.tokens"].data) == cfg["vocab_size"]
    assert field(r, "tokenizer.ggml.bos_token_id") == ([V.UINT32], cfg["bos_token_id"])
    assert field(r, "tokenizer.ggml.add_bos_token") == ([V.BOOL], True)
    assert "<｜Assistant｜>" in field(r, "tokenizer.chat_template")[1] or preset == "tiny-v2"
    rs = cfg.get("rope_scaling")
    if rs:
        assert field(r, "deepseek2.rope.scaling.type") == ([V.STRING], "yarn")
        mul = field(r, "deepseek2.rope.scaling.yarn_log_multiplier")[1]
        assert mul == pytest.approx(0.1 * rs["mscale_all_dim"])
    else:
        assert "deepseek2.rope.scaling.type" not in r.fields


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_bytes_equal_gguf_py(converted, qtype):
    """Every quantized tensor equals gguf-py's quantizer applied to the F32 file's tensor."""
    ref = {t.name: t for t in gguf.GGUFReader(converted["tiny-v3", "f32"]).tensors}
    n_checked = 0
    for t in gguf.GGUFReader(converted["tiny-v3", qtype]).tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        expect = gguf.quants.quantize(np.asarray(ref[t.name].data), t.tensor_type)
        np.testing.assert_array_equal(np.asarray(t.data), expect, err_msg=t.name)
        n_checked += 1
    assert n_checked >= 20


def test_norms_router_and_bias_stay_f32(converted):
    for t in gguf.GGUFReader(converted["tiny-v3", "q4_0"]).tensors:
        if t.name.endswith(("_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name


def test_mla_split_and_expert_stacking(converted, checkpoints):
    """attn_k_b[h] = W_UK_h^T, attn_v_b[h] = W_UV_h, ffn_*_exps[e] = expert e: from the HF tensors."""
    src = checkpoints["tiny-moonlight"]  # BF16 values are exact in float32
    cfg = json.loads((src / "config.json").read_text())
    H, N, Vd = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(converted["tiny-moonlight", "f32"]).tensors}
    kv_b = _bf16_tensor(src, "model.layers.1.self_attn.kv_b_proj.weight").reshape(H, N + Vd, -1)
    np.testing.assert_array_equal(ours["blk.1.attn_k_b.weight"], kv_b[:, :N].transpose(0, 2, 1))
    np.testing.assert_array_equal(ours["blk.1.attn_v_b.weight"], kv_b[:, N:])
    up3 = _bf16_tensor(src, "model.layers.1.mlp.experts.3.up_proj.weight")
    np.testing.assert_array_equal(ours["blk.1.ffn_up_exps.weight"][3], up3)


def _bf16_tensor(src, name):
    """Read one BF16 tensor straight from the safetensors bytes (independent of our reader)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"] if (src / "model.safetensors.index.json").exists() else None
    path = src / (index[name] if index else "model.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8 : 8 + n])[name]
    a, b = info["data_offsets"]
    bits = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(info["shape"])


def test_fp8_dequantization_matches_hand_computation(converted, checkpoints):
    """W = e4m3(bits) * scale_inv[i // 128, j // 128], the decode written out by hand, edge blocks included."""
    src = checkpoints["tiny-v3-fp8"]
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(converted["tiny-v3-fp8", "f32"]).tensors}
    n_edge = 0
    for f in sorted(src.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] != "F8_E4M3" or ".layers.3." in name:
                continue
            a, b = info["data_offsets"]
            bits = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.uint8).reshape(info["shape"])
            scale = _f32_tensor(src, name + "_scale_inv")
            w = _e4m3_by_hand(bits) * np.repeat(np.repeat(scale, 128, 0), 128, 1)[: bits.shape[0], : bits.shape[1]]
            n_edge += any(d % 128 for d in bits.shape) and max(bits.shape) > 128
            np.testing.assert_array_equal(_gguf_view(ours, name), w.astype(np.float32), err_msg=name)
    assert n_edge >= 1  # at least one tensor with a partial 128-block was checked


def _e4m3_by_hand(bits):
    s = np.where(bits & 0x80, -1.0, 1.0)
    e, m = (bits >> 3) & 0xF, bits & 0x7
    return (s * np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e.astype(np.int64) - 7))).astype(np.float32)


def _f32_tensor(src, name):
    for f in sorted(src.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        if name in header:
            a, b = header[name]["data_offsets"]
            return np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(header[name]["shape"])
    raise KeyError(name)


def _gguf_view(ours, hf_name):
    """The GGUF tensor (or expert slice) holding an HF weight of the FP8 test checkpoint."""
    parts = hf_name.split(".")
    layer = parts[2]
    table = {"q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a_mqa", "o_proj": "attn_output"}
    if parts[3] == "self_attn" and parts[4] in table:
        return ours[f"blk.{layer}.{table[parts[4]]}.weight"]
    if parts[4] == "experts":
        return ours[f"blk.{layer}.ffn_{parts[6][:-5]}_exps.weight"][int(parts[5])]
    if parts[4] == "shared_experts":
        return ours[f"blk.{layer}.ffn_{parts[5][:-5]}_shexp.weight"]
    if parts[3] == "mlp":
        return ours[f"blk.{layer}.ffn_{parts[4][:-5]}.weight"]
    if parts[4] == "kv_b_proj":
        k_b, v_b = ours[f"blk.{layer}.attn_k_b.weight"], ours[f"blk.{layer}.attn_v_b.weight"]
        return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])
    raise KeyError(hf_name)


def test_conversion_is_deterministic(checkpoints, tmp_path):
    a = convert(checkpoints["tiny-v3-fp8"], tmp_path / "a.gguf", "q4_0").path.read_bytes()
    b = convert(checkpoints["tiny-v3-fp8"], tmp_path / "b.gguf", "q4_0").path.read_bytes()
    assert a == b


def _broken_copy(checkpoints, tmp_path, preset="tiny-v3"):
    dst = tmp_path / "src"
    shutil.copytree(checkpoints[preset], dst)
    return dst


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda s: (s / "config.json").unlink(), "missing config.json"),
        (lambda s: (s / "tokenizer.json").unlink(), "missing tokenizer.json"),
        (lambda s: next(s.glob("model-00002*")).unlink(), "missing shard model-00002-of-00002.safetensors"),
        (lambda s: _edit_config(s, architectures=["LlamaForCausalLM"]), "unsupported architecture 'LlamaForCausalLM'"),
        (lambda s: _edit_config(s, kv_lora_rank=64), r"kv_a_proj_with_mqa.weight: shape \[48, 64\] does not match"),
        (lambda s: _truncate(next(s.glob("model-00002*"))), "past the end of the file"),
    ],
)
def test_bad_inputs_give_one_line_errors_and_no_output(checkpoints, tmp_path, breakage, message):
    src = _broken_copy(checkpoints, tmp_path)
    breakage(src)
    out = tmp_path / "out.gguf"
    with pytest.raises(CheckpointError, match=message) as e:
        convert(src, out, "q8_0")
    assert "\n" not in str(e.value)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*tmp")) == []


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def test_missing_fp8_scale_is_an_error(checkpoints, tmp_path):
    src = _broken_copy(checkpoints, tmp_path, "tiny-v3-fp8")
    _drop_tensor(src, "model.layers.0.self_attn.q_a_proj.weight_scale_inv")
    with pytest.raises(CheckpointError, match="q_a_proj.weight has no .*_scale_inv"):
        convert(src, tmp_path / "out.gguf", "f16")


def test_unsupported_dtype_names_the_tensor(checkpoints, tmp_path):
    src = _broken_copy(checkpoints, tmp_path, "tiny-moonlight")
    _set_dtype(src, "model.norm.weight", "I16")
    with pytest.raises(CheckpointError, match="model.norm.weight has unsupported dtype I16"):
        convert(src, tmp_path / "out.gguf", "f16")


def _rewrite_header(src, edit):
    for f in src.glob("*.safetensors"):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        if edit(header):
            new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
            assert len(new) == n
            f.write_bytes(raw[:8] + new + raw[8 + n :])


def _drop_tensor(src, name):
    """Remove a tensor from its shard's header and from the index (which must agree with the shards)."""
    _rewrite_header(src, lambda h: h.pop(name, None) is not None)
    index = src / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"].pop(name, None)
        index.write_text(json.dumps(doc))


def _set_dtype(src, name, dtype):
    def edit(h):
        if name in h:
            h[name]["dtype"] = dtype
            return True
        return False

    _rewrite_header(src, edit)


def test_refuses_to_overwrite_without_force(checkpoints, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(checkpoints["tiny-v2"]), "-o", str(out), "--type", "q8_0"])
    assert res.exit_code == 1 and "exists (use --force" in res.output and out.read_bytes() == b"keep me"
    res = runner.invoke(cli, ["convert", str(checkpoints["tiny-v2"]), "-o", str(out), "--type", "q8_0", "--force"])
    assert res.exit_code == 0, res.output
    assert "bits/weight" in res.output and out.read_bytes()[:4] == b"GGUF"


def test_interrupted_conversion_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """An interrupt in the middle of the tensor stream removes the temporary file."""
    import r1cpu.runtime.convert as conv

    calls = {"n": 0}
    real = conv.quantize_rows

    def interrupt_later(x, qtype):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(x, qtype)

    monkeypatch.setattr(conv, "quantize_rows", interrupt_later)
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoints["tiny-v3"], tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []
