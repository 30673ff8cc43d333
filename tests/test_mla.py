"""MLA: absorbed vs naive, the latent-only cache, and prefill + decode vs one batch."""

import numpy as np
import pytest

from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor
from r1cpu.runtime import mla
from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.kv_cache import MLACache
from r1cpu.runtime.rope import Rope, apply_rope
from r1cpu.runtime.weights import AttnWeights

D, H, C, R, N, V, QL = 48, 3, 20, 8, 12, 10, 16


def tiny_config(q_lora=QL) -> ModelConfig:
    return ModelConfig(
        n_vocab=50, n_embd=D, n_layer=2, n_ctx_train=256, n_ff=64, rms_eps=1e-6,
        n_head=H, q_lora_rank=q_lora, kv_lora_rank=C, qk_nope_head_dim=N, qk_rope_head_dim=R, v_head_dim=V,
        rope_theta=10000.0, rope_scaling="yarn", rope_factor=40.0, rope_orig_ctx=8, mscale_all_dim=1.0,
        n_dense_lead=1, n_expert=0, n_expert_used=0, n_expert_shared=0, n_ff_exp=0, n_group=1,
        n_group_used=1, gating="sigmoid", expert_weights_norm=True, expert_weights_scale=1.0,
        bos_id=0, eos_id=1,
    )  # fmt: skip


def f32(name, a):
    a = np.ascontiguousarray(a, dtype=np.float32)
    return Tensor(name, GGMLType.F32, a.shape, a)


def random_weights(rng, cfg, layout="split"):
    """Both layouts built from one kv_b (H*(N+V), C), as the converter splits it."""
    s = lambda *shape: rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-1])  # noqa: E731
    kv_b = s(H * (N + V), C)
    per_head = kv_b.reshape(H, N + V, C)
    k_b, v_b = per_head[:, :N].transpose(0, 2, 1), per_head[:, N:]  # (H, C, N), (H, V, C)
    ql = cfg.q_lora_rank
    return AttnWeights(
        q_a=f32("q_a", s(ql, D)) if ql else None,
        q_a_norm=(1 + 0.1 * rng.standard_normal(ql)).astype(np.float32) if ql else None,
        q_b=f32("q_b", s(H * (N + R), ql)) if ql else None,
        q=None if ql else f32("q", s(H * (N + R), D)),
        kv_a_mqa=f32("kv_a", s(C + R, D)),
        kv_a_norm=(1 + 0.1 * rng.standard_normal(C)).astype(np.float32),
        k_b=f32("k_b", k_b) if layout == "split" else f32("k_b^T", np.ascontiguousarray(k_b)),
        v_b=f32("v_b", v_b),
        kv_b=f32("kv_b", kv_b) if layout == "legacy" else None,
        output=f32("out", s(D, H * V)),
    )


def reference(x, w, cfg):
    """HF's naive MLA in float64, written independently of runtime/mla.py."""
    x = x.astype(np.float64)
    T = x.shape[0]

    def norm(v, g, eps):
        return g * v / np.sqrt((v * v).mean(-1, keepdims=True) + eps)

    if w.q is not None:
        q = x @ w.q.data.T
    else:
        q = norm(x @ w.q_a.data.T, w.q_a_norm, 1e-6) @ w.q_b.data.T
    q = q.reshape(T, H, N + R)
    kv = x @ w.kv_a_mqa.data.T
    c, k_pe = norm(kv[:, :C], w.kv_a_norm, 1e-6), kv[:, C:]
    rope = Rope(cfg)
    cos, sin = (a.astype(np.float64) for a in rope.tables(np.arange(T)))

    def rot(v):  # interleaved pairs (2i, 2i+1)
        out = v.copy()
        shape = (T,) + (1,) * (v.ndim - 2) + (R // 2,)
        cc, ss = cos.reshape(shape), sin.reshape(shape)
        out[..., 0::2] = v[..., 0::2] * cc - v[..., 1::2] * ss
        out[..., 1::2] = v[..., 0::2] * ss + v[..., 1::2] * cc
        return out

    q_pe, k_pe = rot(q[..., N:]), rot(k_pe)
    w_uk = w.k_b.data.astype(np.float64).transpose(0, 2, 1)  # (H, N, C)
    k_nope = np.einsum("hnc,uc->uhn", w_uk, c)
    v = np.einsum("hvc,uc->uhv", w.v_b.data.astype(np.float64), c)
    s = np.einsum("thn,uhn->htu", q[..., :N], k_nope) + np.einsum("thr,ur->htu", q_pe, k_pe)
    s = s * cfg.softmax_scale + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("htu,uhv->thv", p, v).reshape(T, H * V)
    return o @ w.output.data.T


def run(x, w, cfg, form, cache=None):
    cache = cache or MLACache(1, C, R, n_ctx=64, initial=4)
    cache.reserve(x.shape[0])
    cos, sin = Rope(cfg).tables(cache.length + np.arange(x.shape[0]))
    out = mla.attention(x, w, cfg, cos, sin, cache, 0, form)
    cache.advance(x.shape[0])
    return out, cache


@pytest.mark.parametrize("q_lora", [QL, 0])
@pytest.mark.parametrize("layout", ["split", "legacy"])
def test_naive_and_absorbed_match_reference(q_lora, layout):
    cfg = tiny_config(q_lora)
    rng = np.random.default_rng(1)
    w = random_weights(rng, cfg, layout)
    x = rng.standard_normal((21, D)).astype(np.float32)  # past rope_orig_ctx = 8
    ref = reference(x, w, cfg)
    naive, _ = run(x, w, cfg, "naive")
    absorbed, _ = run(x, w, cfg, "absorbed")
    scale = np.abs(ref).max()
    assert np.abs(naive - ref).max() / scale < 1e-5
    assert np.abs(absorbed - ref).max() / scale < 1e-5
    assert np.abs(absorbed - naive).max() / scale < 1e-5


def test_cache_holds_latent_and_rotated_rope_key_only():
    cfg = tiny_config()
    rng = np.random.default_rng(2)
    w = random_weights(rng, cfg)
    x = rng.standard_normal((7, D)).astype(np.float32)
    _, cache = run(x, w, cfg, "absorbed")
    assert cache.width == C + R  # numbers per token per layer
    assert cache.kv[0].shape[1] == C + R and cache.length == 7
    kv = x.astype(np.float64) @ w.kv_a_mqa.data.T
    c = kv[:, :C] / np.sqrt((kv[:, :C] ** 2).mean(-1, keepdims=True) + 1e-6) * w.kv_a_norm
    cos, sin = Rope(cfg).tables(np.arange(7))
    k_pe = apply_rope(kv[:, C:].astype(np.float32), cos, sin)  # rotated, not normalized
    np.testing.assert_allclose(cache.kv[0][:7, :C], c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.kv[0][:7, C:], k_pe, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["split", "legacy"])
def test_prefill_then_decode_equals_one_batch(layout):
    cfg = tiny_config()
    rng = np.random.default_rng(3)
    w = random_weights(rng, cfg, layout)
    x = rng.standard_normal((13, D)).astype(np.float32)
    full, _ = run(x, w, cfg, "naive" if layout == "legacy" else "absorbed")
    first, cache = run(x[:5], w, cfg, "naive")
    rows = [first] + [run(x[i : i + 1], w, cfg, "absorbed", cache)[0] for i in range(5, 13)]
    assert cache.capacity >= 13 and cache.length == 13  # grew from 4 by doubling
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_rope_rotates_interleaved_pairs():
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    cos = np.array([[0.0, 1.0]], dtype=np.float32)  # pair 0 turns by 90 degrees, pair 1 not at all
    sin = np.array([[1.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(apply_rope(x, cos, sin), [[-2.0, 1.0, 3.0, 4.0]])


def test_prefill_in_query_chunks_equals_one_chunk(monkeypatch):
    cfg = tiny_config()
    rng = np.random.default_rng(4)
    w = random_weights(rng, cfg)
    x = rng.standard_normal((17, D)).astype(np.float32)
    whole, _ = run(x, w, cfg, "absorbed")
    monkeypatch.setattr(mla, "SCORE_BUDGET", H * 17 * 3)  # 3 query rows per chunk
    chunked, _ = run(x, w, cfg, "absorbed")
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("T, first", [(1, 0), (1, 40), (6, 0), (5, 37)])
def test_attention_kernel_matches_numpy(T, first):
    from r1cpu.kernels_numba.attention import mla_attend

    rng = np.random.default_rng(5)
    L, Hh, Cc, W = first + T, 5, 40, 48
    q = rng.standard_normal((T, Hh, W)).astype(np.float32)
    kv = rng.standard_normal((L + 3, W)).astype(np.float32)[:L]  # rows past L are never read
    s = np.einsum("thw,uw->thu", q.astype(np.float64), kv) * 0.3
    s = np.where(np.arange(L)[None, None, :] > (first + np.arange(T))[:, None, None], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(mla_attend(q, kv, Cc, 0.3, first), p @ kv[:, :Cc], rtol=1e-5, atol=1e-5)


def test_truncated_cache_recomputes_like_fresh():
    cfg = tiny_config()
    rng = np.random.default_rng(6)
    w = random_weights(rng, cfg)
    x = rng.standard_normal((12, D)).astype(np.float32)
    y = rng.standard_normal((4, D)).astype(np.float32)
    _, cache = run(x, w, cfg, "absorbed")
    cache.truncate(8)  # drop the last 4 tokens, then continue with other ones
    again, cache = run(y, w, cfg, "absorbed", cache)
    fresh, _ = run(np.concatenate([x[:8], y]), w, cfg, "absorbed")
    np.testing.assert_allclose(again, fresh[8:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        cache.truncate(13)
