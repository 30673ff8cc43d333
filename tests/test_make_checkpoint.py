"""tools/make_checkpoint.py: the random HF-layout checkpoints that converter tests start from."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from r1cpu.tools.make_checkpoint import make_checkpoint
from r1cpu.tools.safetensors_io import (
    bf16_to_f32,
    f8_e4m3_to_f32,
    f32_to_bf16,
    f32_to_f8_e4m3,
    read_f32,
    read_header,
)

TINY = ["tiny-v3", "tiny-v3-fp8", "tiny-v2", "tiny-moonlight"]
# Fields of the released DeepSeek-V3/R1 and V2-Lite config.json files (docs/deepseek-math.md §1).
REAL_FIELDS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "moe_intermediate_size", "num_hidden_layers", "first_k_dense_replace", "moe_layer_freq",
    "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group",
    "routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method",
    "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "hidden_act", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rms_norm_eps", "attention_bias", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "torch_dtype",
}  # fmt: skip
CHAT_SPECIALS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁sep｜>"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {p: make_checkpoint(p, root / p) for p in TINY}


def headers(ckpt: Path) -> dict[str, tuple[Path, dict]]:
    """tensor name -> (file, header entry) over all shards."""
    return {
        name: (path, entry)
        for path in sorted(ckpt.glob("*.safetensors"))
        for name, entry in read_header(path).items()
    }


def config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def file_hashes(ckpt: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(ckpt.iterdir())}


def test_same_seed_gives_identical_files_and_another_seed_other_weights(ckpts, tmp_path):
    again = make_checkpoint("tiny-v3-fp8", tmp_path / "again")
    assert file_hashes(again) == file_hashes(ckpts["tiny-v3-fp8"])
    other = file_hashes(make_checkpoint("tiny-v3-fp8", tmp_path / "seed1", seed=1))
    shard = "model-00001-of-00002.safetensors"
    assert other[shard] != file_hashes(again)[shard]
    assert other["config.json"] == file_hashes(again)["config.json"]


@pytest.mark.parametrize("preset", TINY)
def test_config_has_the_real_fields(ckpts, preset):
    cfg = config(ckpts[preset])
    assert cfg.keys() >= REAL_FIELDS
    assert cfg["vocab_size"] % 32 == 0
    v3 = cfg["model_type"] == "deepseek_v3"
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"]
    assert (cfg["scoring_func"], cfg["topk_method"]) == (
        ("sigmoid", "noaux_tc") if v3 else ("softmax", "greedy")
    )
    assert ("quantization_config" in cfg) == preset.endswith("fp8")


def test_preset_specifics(ckpts):
    v3, v2, moon = (config(ckpts[p]) for p in ("tiny-v3", "tiny-v2", "tiny-moonlight"))
    assert v3["n_group"] > 1 and v3["q_lora_rank"] and v3["num_nextn_predict_layers"] == 1
    assert v3["rope_scaling"]["type"] == "yarn"
    assert v3["rope_scaling"]["original_max_position_embeddings"] < 48
    assert v2["rope_scaling"]["mscale_all_dim"] == 0.707 and v2["q_lora_rank"] is None
    assert not v2["norm_topk_prob"] and v2["routed_scaling_factor"] == 1.0
    assert moon["rope_scaling"] is None and moon["n_group"] == 1 and moon["q_lora_rank"] is None
    assert (moon["rope_theta"], moon["rms_norm_eps"]) == (50000.0, 1e-5)


def expected_shapes(cfg: dict, layer: int, moe: bool) -> dict[str, tuple[int, ...]]:
    """The per-layer tensors of docs/deepseek-math.md §2, from config values only."""
    d, h, e = cfg["hidden_size"], cfg["num_attention_heads"], cfg["n_routed_experts"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    c, ff = cfg["kv_lora_rank"], cfg["moe_intermediate_size"]
    pre = f"model.layers.{layer}."
    shapes = {
        "self_attn.kv_a_proj_with_mqa": (c + cfg["qk_rope_head_dim"], d),
        "self_attn.kv_b_proj": (h * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), c),
        "self_attn.o_proj": (d, h * cfg["v_head_dim"]),
        "input_layernorm": (d,),
        "self_attn.kv_a_layernorm": (c,),
    }
    if cfg["q_lora_rank"]:
        shapes["self_attn.q_b_proj"] = (h * qk, cfg["q_lora_rank"])
    else:
        shapes["self_attn.q_proj"] = (h * qk, d)
    if moe:
        shapes["mlp.gate"] = (e, d)
        shapes[f"mlp.experts.{e - 1}.down_proj"] = (d, ff)
        shapes["mlp.shared_experts.up_proj"] = (ff * cfg["n_shared_experts"], d)
    else:
        shapes["mlp.gate_proj"] = (cfg["intermediate_size"], d)
    return {pre + k + ".weight": v for k, v in shapes.items()}


@pytest.mark.parametrize("preset", TINY)
def test_tensor_names_and_shapes_follow_the_releases(ckpts, preset):
    cfg, found = config(ckpts[preset]), headers(ckpts[preset])
    n = cfg["num_hidden_layers"]
    for layer in range(n):
        for name, shape in expected_shapes(
            cfg, layer, layer >= cfg["first_k_dense_replace"]
        ).items():
            assert tuple(found[name][1]["shape"]) == shape, name
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert (bias in found) == (cfg["topk_method"] == "noaux_tc")
    assert bias not in found or found[bias][1]["dtype"] == "F32"
    assert tuple(found["lm_head.weight"][1]["shape"]) == (cfg["vocab_size"], cfg["hidden_size"])
    mtp = cfg.get("num_nextn_predict_layers", 0)
    assert any(k.startswith(f"model.layers.{n}.") for k in found) == bool(mtp)


def test_mtp_layer_is_a_full_moe_layer_with_copies(ckpts):
    ckpt = ckpts["tiny-v3"]
    cfg, found = config(ckpt), headers(ckpt)
    mtp = cfg["num_hidden_layers"]
    for name, shape in expected_shapes(cfg, mtp, moe=True).items():
        assert tuple(found[name][1]["shape"]) == shape, name
    d = cfg["hidden_size"]
    assert found[f"model.layers.{mtp}.eh_proj.weight"][1]["shape"] == [d, 2 * d]
    for copy, original in [("embed_tokens", "model.embed_tokens"), ("shared_head.head", "lm_head")]:
        name = f"model.layers.{mtp}.{copy}.weight"
        assert np.array_equal(
            read_f32(found[name][0], name),
            read_f32(found[original + ".weight"][0], original + ".weight"),
        )


def test_fp8_weights_have_block_scales_and_match_the_bf16_model(ckpts):
    fp8, bf16 = headers(ckpts["tiny-v3-fp8"]), headers(ckpts["tiny-v3"])
    quantized = [n for n, (_, e) in fp8.items() if e["dtype"] == "F8_E4M3"]
    edge_blocks = 0
    for name in quantized:
        rows, cols = fp8[name][1]["shape"]
        scale = read_f32(fp8[name + "_scale_inv"][0], name + "_scale_inv")
        assert scale.shape == (math.ceil(rows / 128), math.ceil(cols / 128)), name
        edge_blocks += (rows > 128 and rows % 128 != 0) + (cols > 128 and cols % 128 != 0)
        full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:rows, :cols]
        w = read_f32(fp8[name][0], name) * full
        ref = read_f32(bf16[name][0], name)
        # e4m3 keeps 3 mantissa bits: relative error <= 1/16 above the subnormal range.
        assert np.all(np.abs(w - ref) <= np.abs(ref) / 16 + full * 2.0**-9), name
    assert edge_blocks >= 2
    unquantized = set(bf16) - set(quantized)
    assert {
        "lm_head.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.1.mlp.gate.weight",
    } <= unquantized
    assert all(fp8[n][1]["dtype"] in ("BF16", "F32") for n in unquantized)
    assert len(quantized) == len([n for n in bf16 if "proj" in n and "eh_proj" not in n])


def test_fp8_encoder_rounds_to_the_nearest_code_ties_to_even():
    codes = np.arange(256, dtype=np.uint8)
    values = f8_e4m3_to_f32(codes)
    finite = ~np.isnan(values)
    assert np.array_equal(f32_to_f8_e4m3(values[finite]), codes[finite])
    assert values[finite].max() == 448.0 and values[1] == 2.0**-9
    x = np.random.default_rng(0).uniform(-448, 448, 20000).astype(np.float32) * np.float32(0.01)
    decoded = f8_e4m3_to_f32(f32_to_f8_e4m3(x))
    nearest = np.min(np.abs(x[:, None] - values[finite][None, :]), axis=1)
    assert np.array_equal(np.abs(decoded - x), nearest)
    # 1.0625 lies halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1): even mantissa wins.
    assert f8_e4m3_to_f32(f32_to_f8_e4m3(np.float32([1.0625, 1.1875]))).tolist() == [1.0, 1.25]


def test_bf16_rounds_to_nearest_even():
    # bf16 keeps 7 mantissa bits: 1 + 2^-8 and 1 + 3*2^-8 are ties, 1 + 2^-8 + 2^-20 is not.
    x = np.float32([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-20, -3.0])
    assert bf16_to_f32(f32_to_bf16(x)).tolist() == [1.0, 1.0 + 2.0**-6, 1.0 + 2.0**-7, -3.0]


@pytest.mark.parametrize("preset", TINY)
def test_shard_index_matches_the_files(ckpts, preset):
    ckpt = ckpts[preset]
    found = headers(ckpt)
    index_path = ckpt / "model.safetensors.index.json"
    if not index_path.exists():
        assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"]
        return
    index = json.loads(index_path.read_text())
    assert index["weight_map"] == {name: path.name for name, (path, _) in found.items()}
    sizes = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, e in found.values())
    assert index["metadata"]["total_size"] == sizes
    assert 2 <= len(set(index["weight_map"].values())) <= 3


def test_files_parse_with_the_safetensors_package(ckpts):
    ckpt = ckpts["tiny-moonlight"]
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(ckpt / "model.safetensors", framework="numpy") as f:
        assert set(f.keys()) == set(headers(ckpt))
        assert np.array_equal(f.get_tensor(name), read_f32(ckpt / "model.safetensors", name))


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2"])
def test_trimmed_tokenizer_loads_and_round_trips(ckpts, preset):
    ckpt = ckpts[preset]
    cfg, tok_config = config(ckpt), json.loads((ckpt / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert cfg["vocab_size"] - 32 < tok.get_vocab_size() <= cfg["vocab_size"]
    assert tok.id_to_token(cfg["bos_token_id"]) == tok_config["bos_token"]["content"]
    assert tok.id_to_token(cfg["eos_token_id"]) == tok_config["eos_token"]["content"]
    text = "Hello world, 1234567 apples! 你好，世界 ✓ e.g. x+y=12.5%\n\tend"
    assert tok.decode(tok.encode(text).ids) == text
    if preset == "tiny-v3":
        ids = tok.encode("".join(CHAT_SPECIALS)).ids
        assert ids == [tok.token_to_id(s) for s in CHAT_SPECIALS] and min(ids) >= 1000


def test_trimmed_r1_tokenizer_keeps_the_byte_alphabet(ckpts):
    vocab = Tokenizer.from_file(str(ckpts["tiny-v3"] / "tokenizer.json")).get_vocab()
    assert set(ByteLevel.alphabet()) <= vocab.keys()
