"""Mixture of experts: the router (deepseek-math.md §5.2-5.3) and the expert FFNs.

Shapes: T tokens, D n_embd, E routed experts, K used per token, F expert width, S shared experts.

sigmoid (V3/R1, Moonlight, noaux_tc):
    s = sigmoid(W_g x); b = s + bias (selection only)
    group score = sum of the top-2 b per group; keep n_group_used groups, others -inf
    idx = top-K of b;  w = s[idx] (unbiased)
softmax (V2): s = softmax(W_g x); group score = max s per group (HF group_limited_greedy);
    idx = top-K of s; w = s[idx]
then w /= sum(w) + 1e-20 if expert_weights_norm; w *= expert_weights_scale.
Ties: the lower expert index wins (stable sort), for both groups and experts.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from r1cpu.kernels_numba import fused_moe
from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.weights import DenseWeights, MoEWeights, linear


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-z))).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@njit(cache=True, inline="always")
def _better(v, a, b) -> bool:
    # a beats the current best b (-1: none yet): larger, NaN last, the lower index on ties (scan order)
    return b < 0 or v[a] > v[b] or (np.isnan(v[b]) and not np.isnan(v[a]))


@njit(cache=True, inline="always")
def _top_into(out, v, taken):
    # the len(out) best of v, best first, marking them in taken
    for j in range(out.size):
        best = -1
        for e in range(v.size):
            if not taken[e] and _better(v, e, best):
                best = e
        out[j] = best
        taken[best] = True


@njit(cache=True)
def _select(choice, n_group, n_group_used, top2_groups, idx):
    # idx (T, K) = the top-K of choice (T, E) within each token's best n_group_used groups, groups
    # scored by the sum of their top two (top2_groups) or their maximum. choice is masked in place.
    T, E = choice.shape
    per = E // n_group
    score, keep, first = np.empty(n_group, np.float32), np.empty(n_group_used, np.int64), np.empty(min(2, per), np.int64)
    taken = np.empty(E, np.bool_)
    for t in range(T):
        v = choice[t]
        if n_group > 1:
            for g in range(n_group):
                part = v[g * per : (g + 1) * per]
                taken[:per] = False
                _top_into(first, part, taken[:per])
                score[g] = part[first[0]] + part[first[1]] if top2_groups and per > 1 else part[first[0]]
            taken[:n_group] = False
            _top_into(keep, score, taken[:n_group])
            for g in range(n_group):
                if not taken[g]:
                    v[g * per : (g + 1) * per] = -np.inf  # -inf, not 0: biased scores can be negative
        taken[:] = False
        _top_into(idx[t], v, taken)


def route(logits: np.ndarray, bias: np.ndarray | None, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (T, E) float32 -> expert indices (T, K) int64 and weights (T, K) float32."""
    T, E = logits.shape
    if cfg.gating == "sigmoid":
        scores = _sigmoid(logits)
        choice = scores + bias if bias is not None else scores.copy()
    else:
        scores = _softmax(logits)
        choice = scores.copy()
    idx = np.empty((T, cfg.n_expert_used), np.int64)
    # node-limited routing (sigmoid): a group's score is the sum of its top-2 affinities; V2: the max
    _select(choice.astype(np.float32, copy=False), cfg.n_group, cfg.n_group_used, cfg.gating == "sigmoid", idx)
    w = np.take_along_axis(scores, idx, axis=-1)
    if cfg.expert_weights_norm:
        w = w / (w.sum(axis=-1, keepdims=True, dtype=np.float32) + np.float32(1e-20))
    return idx, (w * np.float32(cfg.expert_weights_scale)).astype(np.float32)


def swiglu(x: np.ndarray, gate, up, down) -> np.ndarray:
    """down(silu(gate x) * up x): x (T, D) -> (T, D)."""
    g = linear(x, gate)
    g *= _sigmoid(g)
    g *= linear(x, up)
    return linear(g, down)


def dense_ffn(x: np.ndarray, w: DenseWeights) -> np.ndarray:
    return swiglu(x, w.gate, w.up, w.down)


class ExpertStats:
    """What the routed experts cost: bytes of expert weights read and token-slots served.

    bytes_read[layer, e] grows by expert e's three slices each time a batch runs it (once per
    batch however many of its tokens chose it); tokens[layer, e] by the number of those tokens.
    last_idx[layer] is the latest (T, K) routing of that layer.
    """

    def __init__(self, n_layer: int, n_expert: int):
        self.bytes_read = np.zeros((n_layer, max(n_expert, 1)), dtype=np.int64)
        self.tokens = np.zeros_like(self.bytes_read)
        self.last_idx: list[np.ndarray | None] = [None] * n_layer

    def reset(self) -> None:
        self.bytes_read[:] = 0
        self.tokens[:] = 0
        self.last_idx = [None] * len(self.last_idx)


def moe(x: np.ndarray, w: MoEWeights, cfg: ModelConfig, stats: ExpertStats | None = None, layer: int = 0) -> np.ndarray:
    """x (T, D) -> (T, D): routed experts (each used once per batch on its tokens) + shared."""
    idx, weight = route(linear(x, w.gate_inp), w.probs_bias, cfg)
    if x.shape[0] == 1 and w.fused is not None and idx.shape[1] <= w.capacity:
        y = _moe_token(x[0], w, idx[0], weight[0])[None]
        if stats is not None:
            _count(stats, layer, w, idx[0], np.ones(idx.shape[1], np.int64))
            stats.last_idx[layer] = idx
        return y
    y = np.zeros_like(x, dtype=np.float32)
    used = np.unique(idx)  # ascending expert index, as HF accumulates
    batched = w.batch is not None and fused_moe.batch_pays(w.batch, idx.size, used.size)
    for start in range(0, len(used), w.capacity):  # a batch needing more experts than cache slots: in turns
        chunk = used[start : start + w.capacity]
        if batched:  # every expert of the turn in one kernel
            gate, up, down, slots = w.resolve(chunk)
            y += fused_moe.moe_batch(x, w.batch, (gate, up, down), slots, idx, weight, chunk)
            if stats is not None:
                _count(stats, layer, w, chunk, [np.count_nonzero(idx == e) for e in chunk])
            continue
        for e, s in zip(chunk, w.resolve(chunk)[3]):
            rows, k = np.nonzero(idx == e)  # a token picks an expert at most once
            out = dense_ffn(np.ascontiguousarray(x[rows]), w.slot_ffn(s))
            y[rows] += out * weight[rows, k, None]
            if stats is not None:
                _count(stats, layer, w, [e], [len(rows)])
    if stats is not None:
        stats.last_idx[layer] = idx
    if w.shared is not None:
        y += dense_ffn(x, w.shared)
    return y


def _moe_token(x: np.ndarray, w: MoEWeights, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One token through its K routed experts and the shared ones in one fused kernel: (D,)."""
    gate, up, down, slots = w.resolve(ids)
    kinds, shared = w.fused
    return fused_moe.moe_token(x, kinds, (gate, up, down), shared, slots, weights)


def _count(stats: ExpertStats, layer: int, w: MoEWeights, experts, n_tokens) -> None:
    experts = np.asarray(experts, dtype=np.int64)  # distinct ids
    stats.bytes_read[layer, experts] += w.expert_bytes[experts]
    stats.tokens[layer, experts] += n_tokens
