"""Router selection on hand-made scores, and the expert FFN combine with its byte counter.

Each routing case is built so a plausible wrong implementation picks other experts or weights:
weights from biased scores, group score = max instead of top-2 sum, 0.0 instead of -inf
masking, V2 renormalization, unstable tie order.
"""

import dataclasses

import numpy as np
import pytest

from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor
from r1cpu.runtime import moe
from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.weights import DenseWeights, MoEWeights


def config(**kw) -> ModelConfig:
    base = ModelConfig(
        n_vocab=50, n_embd=16, n_layer=1, n_ctx_train=64, n_ff=32, rms_eps=1e-6,
        n_head=2, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
        rope_theta=10000.0, rope_scaling="none", rope_factor=1.0, rope_orig_ctx=64, mscale_all_dim=0.0,
        n_dense_lead=0, n_expert=4, n_expert_used=2, n_expert_shared=0, n_ff_exp=8, n_group=1,
        n_group_used=1, gating="sigmoid", expert_weights_norm=True, expert_weights_scale=2.5,
        bos_id=0, eos_id=1,
    )  # fmt: skip
    return dataclasses.replace(base, **kw)


def logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p)).astype(np.float32)[None, :]


def routed(scores, bias=None, **kw):
    cfg = config(n_expert=len(scores), **kw)
    b = None if bias is None else np.asarray(bias, dtype=np.float32)
    idx, w = moe.route(logit(scores), b, cfg)
    return idx[0].tolist(), w[0]


def test_bias_selects_but_does_not_weight():
    idx, w = routed([0.9, 0.8, 0.7, 0.1], bias=[0, 0, 0.5, 0])
    assert idx == [2, 0]  # biased 1.2 beats 0.9; without the bias it would be [0, 1]
    np.testing.assert_allclose(w, np.array([0.7, 0.9]) / 1.6 * 2.5, rtol=1e-6)  # biased: [1.2, 0.9] / 2.1


def test_no_bias_no_norm():
    idx, w = routed([0.2, 0.6, 0.4, 0.1], expert_weights_norm=False, expert_weights_scale=1.0)
    assert idx == [1, 2]
    np.testing.assert_allclose(w, [0.6, 0.4], rtol=1e-6)


def test_group_score_is_sum_of_top2_not_max():
    # group A = experts 0..3 (max 0.95, top-2 sum 1.05); group B = 4..7 (max 0.6, top-2 sum 1.2)
    s = [0.95, 0.1, 0.1, 0.1, 0.6, 0.6, 0.1, 0.1]
    idx, _ = routed(s, bias=[0] * 8, n_group=2, n_group_used=1)
    assert idx == [4, 5]  # max would keep group A and pick [0, 1]; no grouping would give [0, 4]


def test_masked_groups_are_minus_inf_not_zero():
    # All biased scores negative; group A wins, and only its experts may be chosen.
    s = [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]
    idx, w = routed(s, bias=[-1] * 8, n_group=2, n_group_used=1, n_expert_used=3)
    assert idx == [0, 1, 2]  # 0.0-masking would pick experts of group B (0.0 > -0.5)
    np.testing.assert_allclose(w, np.array([0.5, 0.4, 0.3]) / 1.2 * 2.5, rtol=1e-6)


def test_ties_go_to_the_lower_index():
    idx, _ = routed([0.5, 0.5, 0.5, 0.5])
    assert idx == [0, 1]
    idx, _ = routed([0.3, 0.5, 0.3, 0.5, 0.5, 0.3, 0.5, 0.3], bias=[0] * 8, n_group=2, n_group_used=1)
    assert idx == [1, 3]  # equal group scores: group 0 kept


def test_v2_softmax_greedy_unnormalized_and_scaled():
    logits = np.array([[1.0, 3.0, 2.0, 0.0, -1.0, 2.5]], dtype=np.float32)
    p = np.exp(logits[0] - logits.max())
    p /= p.sum()
    cfg = config(n_expert=6, n_expert_used=2, gating="softmax", expert_weights_norm=False, expert_weights_scale=16.0)
    idx, w = moe.route(logits, None, cfg)
    assert idx[0].tolist() == [1, 5]
    np.testing.assert_allclose(w[0], p[[1, 5]] * 16.0, rtol=1e-6)  # renormalizing would give ~[9.0, 7.0]


def test_v2_group_limited_greedy_uses_group_max():
    p = np.array([0.30, 0.02, 0.02, 0.02, 0.20, 0.20, 0.12, 0.12])
    cfg = config(n_expert=8, n_expert_used=2, gating="softmax", n_group=2, n_group_used=1,
                 expert_weights_norm=False, expert_weights_scale=1.0)  # fmt: skip
    idx, w = moe.route(np.log(p).astype(np.float32)[None, :], None, cfg)
    assert idx[0].tolist() == [0, 1]  # max keeps group A (0.30 > 0.20); top-2 sum would keep B
    np.testing.assert_allclose(w[0], p[[0, 1]], rtol=1e-5)


def test_norm_adds_1e20():
    idx, w = routed([1e-30, 1e-30, 1e-30, 1e-30], expert_weights_scale=1.0)
    assert np.all(np.isfinite(w))


def f32(name, a):
    a = np.ascontiguousarray(a, dtype=np.float32)
    return Tensor(name, GGMLType.F32, a.shape, a)


def test_moe_groups_tokens_by_expert_and_counts_bytes(monkeypatch):
    rng = np.random.default_rng(0)
    D, E, F, T = 16, 6, 8, 9
    cfg = config(n_embd=D, n_expert=E, n_expert_used=2, n_ff_exp=F, n_expert_shared=1, n_group=2, n_group_used=1)
    r = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)  # noqa: E731
    w = MoEWeights(
        gate_inp=f32("gate_inp", r(E, D)), probs_bias=(0.1 * rng.standard_normal(E)).astype(np.float32),
        gate_exps=f32("gate_exps", r(E, F, D)), up_exps=f32("up_exps", r(E, F, D)),
        down_exps=f32("down_exps", r(E, D, F)),
        shared=DenseWeights(f32("gs", r(F, D)), f32("us", r(F, D)), f32("ds", r(D, F))),
    )  # fmt: skip
    x = rng.standard_normal((T, D)).astype(np.float32)
    calls = []
    real = moe.linear
    monkeypatch.setattr(moe, "linear", lambda a, t: calls.append(t.name) or real(a, t))
    stats = moe.ExpertStats(1, E)
    y = moe.moe(x, w, cfg, stats, 0)

    idx, wt = moe.route(x @ w.gate_inp.data.T, w.probs_bias, cfg)
    assert (stats.last_idx[0] == idx).all()
    assert all(len(set(row // 3)) == 1 for row in idx)  # one kept group (3 experts) per token
    used = np.unique(idx)
    assert sorted(n for n in calls if n.startswith("gate_exps")) == [f"gate_exps[{e}]" for e in used]  # once each
    slice_bytes = 2 * F * D * 4 + D * F * 4
    assert stats.bytes_read[0].tolist() == [slice_bytes if e in used else 0 for e in range(E)]
    assert stats.tokens[0].sum() == T * 2

    def ffn(v, g, u, d):
        h = v @ g.T
        return (h / (1 + np.exp(-h)) * (v @ u.T)) @ d.T

    ref = ffn(x, w.shared.gate.data, w.shared.up.data, w.shared.down.data)
    for t in range(T):
        for k in range(2):
            e = idx[t, k]
            ref[t] += wt[t, k] * ffn(x[t], w.gate_exps.data[e], w.up_exps.data[e], w.down_exps.data[e])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gating", ["sigmoid", "softmax"])
def test_route_shapes_and_dtypes(gating):
    cfg = config(n_expert=16, n_expert_used=4, n_group=4, n_group_used=2, gating=gating)
    logits = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    idx, w = moe.route(logits, None, cfg)
    assert idx.shape == (5, 4) and w.shape == (5, 4) and w.dtype == np.float32
    assert all(len(set(row // 4)) <= 2 for row in idx)  # at most n_group_used groups per token
