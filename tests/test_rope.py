"""RoPE/YaRN: the HF inv_freq table bit for bit, the softmax scales of deepseek-math.md §3.4,
and the interleaved pairing."""

import math

import numpy as np
import pytest

from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.rope import Rope, apply_rope, attention_factor, base_inv_freq, inv_freq, yarn_inv_freq

# deepseek-math.md §3.2: HF fp32 table for V3 (theta 1e4, d 64, factor 40, orig 4096, beta 32/1).
HF_V3_HEX = """
3f800000 3f3ff911 3f0ff59a 3ed7e89b 3ea1e89b 3e72d423 3e361887 3e088d77 3dcccccd 3d99940d 3d6655c2 3d1fc5ba
3cdc321b 3c968dc3 3c4bf283 3c088d77 3bb43959 3b697066 3b136a16 3ab3a2cd 3a4f3e37 39d99312 393a7753 380bd471
37d1b717 379d43a3 376bdcf0 3730df51 3704a2b3 36c6ecdd 36952c42 365fba4f
"""


def gguf_kv(**over):
    """deepseek2 metadata as the converter writes it (f32 values rounded like the file)."""
    kv = {
        "general.architecture": "deepseek2",
        "deepseek2.block_count": 61, "deepseek2.context_length": 163840, "deepseek2.embedding_length": 7168,
        "deepseek2.feed_forward_length": 18432, "deepseek2.attention.head_count": 128,
        "deepseek2.attention.key_length_mla": 192, "deepseek2.attention.value_length_mla": 128,
        "deepseek2.attention.key_length": 576, "deepseek2.attention.value_length": 512,
        "deepseek2.attention.q_lora_rank": 1536, "deepseek2.attention.kv_lora_rank": 512,
        "deepseek2.attention.layer_norm_rms_epsilon": float(np.float32(1e-6)),
        "deepseek2.rope.dimension_count": 64, "deepseek2.rope.freq_base": 10000.0,
        "deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 40.0,
        "deepseek2.rope.scaling.original_context_length": 4096,
        "deepseek2.rope.scaling.yarn_log_multiplier": float(np.float32(0.1)),
        "deepseek2.vocab_size": 129280,
    }  # fmt: skip
    for k, v in over.items():
        key = "deepseek2." + k.replace("__", ".")
        if v is None:
            kv.pop(key, None)
        else:
            kv[key] = float(np.float32(v)) if isinstance(v, float) else v
    return kv


def test_v3_yarn_inv_freq_matches_hf_bit_for_bit():
    expected = np.array([int(h, 16) for h in HF_V3_HEX.split()], dtype=np.uint32)
    got = yarn_inv_freq(10000.0, 64, 40.0, 4096, 32.0, 1.0)
    assert got.dtype == np.float32
    assert got.view(np.uint32).tolist() == expected.tolist()
    cfg = ModelConfig.from_gguf(gguf_kv())
    assert inv_freq(cfg).view(np.uint32).tolist() == expected.tolist()  # same through the config


def test_yarn_regions():
    base = base_inv_freq(10000.0, 64)
    got = yarn_inv_freq(10000.0, 64, 40.0, 4096)
    assert (got[:11] == base[:11]).all()  # i <= low = 10: original frequencies
    np.testing.assert_allclose(got[23:], base[23:] / 40, rtol=1e-6)  # i >= high = 23: divided by 40
    i = 16  # blend with weight (i - 10) / 13 on the interpolated frequency
    np.testing.assert_allclose(got[i], base[i] * (1 - 6 / 13) + base[i] / 40 * 6 / 13, rtol=1e-6)


def test_plain_rope_matches_torch_formula():
    torch = pytest.importorskip("torch")
    ref = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    assert base_inv_freq(10000.0, 64).view(np.uint32).tolist() == ref.numpy().view(np.uint32).tolist()


@pytest.mark.parametrize(
    "over, expected",
    [
        ({}, 0.1352337788608801),  # V3/R1
        ({"rope__scaling__yarn_log_multiplier": 0.0707}, 0.11472138679292611),  # V2 / V2-Lite
        ({"rope__scaling__factor": 32.0}, 0.13086079996295005),  # Kimi-K2
        ({"rope__scaling__type": None, "rope__scaling__factor": None,
          "rope__scaling__yarn_log_multiplier": None}, 0.07216878364870322),  # Moonlight
    ],
)  # fmt: skip
def test_softmax_scale_table(over, expected):
    cfg = ModelConfig.from_gguf(gguf_kv(**over))
    assert cfg.softmax_scale == pytest.approx(expected, rel=1e-7)
    assert attention_factor(cfg) == 1.0  # cos/sin unscaled: mscale == mscale_all_dim


def test_attention_factor_without_mscale_all_dim_follows_hf():
    cfg = ModelConfig.from_gguf(gguf_kv(rope__scaling__yarn_log_multiplier=None))
    assert attention_factor(cfg) == pytest.approx(0.1 * math.log(40) + 1)
    assert cfg.softmax_scale == pytest.approx(192**-0.5)


def test_rotation_pairs_are_interleaved():
    # pair 0 = (x0, x1) at frequency 0, pair 1 = (x2, x3) at frequency 1; not (x0, x2) as NeoX.
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    a, b = 0.3, 1.1
    cos = np.array([[math.cos(a), math.cos(b)]], dtype=np.float32)
    sin = np.array([[math.sin(a), math.sin(b)]], dtype=np.float32)
    expected = [
        1 * math.cos(a) - 2 * math.sin(a), 1 * math.sin(a) + 2 * math.cos(a),
        3 * math.cos(b) - 4 * math.sin(b), 3 * math.sin(b) + 4 * math.cos(b),
    ]  # fmt: skip
    np.testing.assert_allclose(apply_rope(x, cos, sin)[0], expected, rtol=1e-6)


def test_rope_dot_product_equals_hf_half_order():
    # HF V3 5.x de-interleaves q and k, then rotate_half: the dot products must agree.
    rng = np.random.default_rng(0)
    cfg = ModelConfig.from_gguf(gguf_kv())
    rope = Rope(cfg)
    pos = np.array([0, 5, 4095, 4096, 9000])
    cos, sin = rope.tables(pos)
    q, k = rng.standard_normal((2, 5, 64)).astype(np.float32)
    ours = (apply_rope(q, cos, sin) * apply_rope(k, cos, sin)).sum(-1)

    def hf(x):
        x = np.concatenate([x[:, 0::2], x[:, 1::2]], axis=-1)
        c, s = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        rot = np.concatenate([-x[:, 32:], x[:, :32]], axis=-1)
        return x * c + rot * s

    np.testing.assert_allclose(ours, (hf(q) * hf(k)).sum(-1), rtol=1e-5, atol=1e-5)


def test_angles_are_fp32_products():
    cfg = ModelConfig.from_gguf(gguf_kv())
    rope = Rope(cfg)
    pos = np.array([0, 1, 7, 100000])
    cos, sin = rope.tables(pos)
    angle = pos.astype(np.float32)[:, None] * rope.inv_freq[None, :]
    assert (cos == np.cos(angle.astype(np.float64)).astype(np.float32)).all()
    assert (sin == np.sin(angle.astype(np.float64)).astype(np.float32)).all()
