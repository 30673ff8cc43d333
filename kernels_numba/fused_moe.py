"""The MoE FFN of one token in two parallel regions: every routed expert and the shared experts at once.

    h_k  = silu(gate[s_k] x) * up[s_k] x        k = 0..K-1 routed (pool slot s_k), and the shared h_sh
    y    = sum_k w_k down[s_k] h_k + down_sh h_sh

Weights come as stacked pools uint8 (slots, rows, row_bytes): without an expert cache the pools are
the file's ffn_*_exps tensors and slot = expert id (MoEWeights.resolve). Shapes: D n_embd, F expert
width, Fs shared width, K experts used.

Region 1 runs tasks of 32 gate/up rows (one activation block) of one expert, over all experts: each
task writes its 32 values of h and quantizes them as one Q8 block, so region 2 reads h as int8.
Region 2 runs chunks of output rows: each row sums the K weighted expert rows and the shared row, so
the weighted sum needs no second pass and no atomics.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

from r1cpu.kernels_numba.actquant import QK, ActQ8
from r1cpu.kernels_numba.intrinsics import KIND_Q4_0, KIND_Q8_0, dot_row
from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor

CHUNK_ROWS = 16  # output rows per region-2 task


@njit(cache=True, inline="always")
def _silu_mul_block(h, g, u):
    for j in range(QK):
        h[j] = g[j] / (np.float32(1.0) + np.exp(-g[j])) * u[j]


@njit(cache=True, inline="always")
def _quantize_block(q, d, s, h, o, b):
    # h[o:o+32] -> one Q8 block at q[o:o+32], d[b], s[b] (as actquant._quantize_row)
    amax = np.float32(0.0)
    for j in range(QK):
        amax = max(amax, abs(h[o + j]))
    inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
    total = np.int32(0)
    for j in range(QK):
        v = np.int32(np.rint(h[o + j] * inv))
        q[o + j] = v
        total += v
    d[b] = amax / np.float32(127.0)
    s[b] = d[b] * np.float32(total)


@njit(cache=True, inline="always")
def _gate_up_block(gu, kind, g_pool, u_pool, slot, r0, xq, xd, xs):
    # gu (2, 32): the gate and up outputs of rows r0..r0+31 of pool slot `slot`
    nb = xd.shape[1]
    for j in range(QK):
        r = r0 + j
        og = slot * g_pool.strides[0] + r * g_pool.strides[1]
        ou = slot * u_pool.strides[0] + r * u_pool.strides[1]
        gu[0, j] = dot_row(kind, g_pool, og, xq, 0, xd, xs, 0, nb)
        gu[1, j] = dot_row(kind, u_pool, ou, xq, 0, xd, xs, 0, nb)


@njit(cache=True, parallel=True)
def _experts_up(h, kinds, pools, slots, xq, xd, xs, gu):
    # pools: (gate, up, shared gate, shared up), uint8 (slots, rows, row_bytes); the shared ones have
    # one slot (zero rows without shared experts). h: (hf, hq, hd, hs), row K = the shared experts.
    # gu float32 (n_tasks, 2, 32): one slice per task, so tasks write disjoint memory.
    hf, hq, hd, hs = h
    g_pool, u_pool, sh_g, sh_u = pools
    K = slots.size
    per_expert = g_pool.shape[1] // QK
    n_routed = K * per_expert
    for task in prange(n_routed + sh_g.shape[1] // QK):
        if task < n_routed:
            k, b = task // per_expert, task % per_expert
            _gate_up_block(gu[task], kinds[0], g_pool, u_pool, slots[k], b * QK, xq, xd, xs)
        else:
            k, b = K, task - n_routed
            _gate_up_block(gu[task], kinds[2], sh_g, sh_u, 0, b * QK, xq, xd, xs)
        _silu_mul_block(hf[k, b * QK : (b + 1) * QK], gu[task, 0], gu[task, 1])
        _quantize_block(hq[k], hd[k], hs[k], hf[k], b * QK, b)


@njit(cache=True, inline="always")
def _down_row(kind, pool, slot, r, hq, hd, hs, k, nb):
    o = slot * pool.strides[0] + r * pool.strides[1]
    return dot_row(kind, pool, o, hq, k * hq.shape[1], hd, hs, k * hd.shape[1], nb)


@njit(cache=True, parallel=True)
def _experts_down(y, kinds, d_pool, sh_d, slots, weights, h, nb, nb_sh):
    # y float32 (D,) = sum_k weights[k] d_pool[slots[k]] h_k + sh_d[0] h_K; nb, nb_sh: blocks of h
    # in a routed and in the shared row (nb_sh = 0: no shared experts)
    _, hq, hd, hs = h
    K, D = slots.size, y.shape[0]
    for c in prange((D + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(c * CHUNK_ROWS, min(D, (c + 1) * CHUNK_ROWS)):
            acc = np.float32(0.0)
            for k in range(K):
                acc += weights[k] * _down_row(kinds[1], d_pool, slots[k], r, hq, hd, hs, k, nb)
            if nb_sh:
                acc += _down_row(kinds[3], sh_d, 0, r, hq, hd, hs, K, nb_sh)
            y[r] = acc


class FusedMoE:
    """Buffers of one MoE layer shape (K used experts, width F, shared width Fs, D), reused per token."""

    def __init__(self, K: int, F: int, Fs: int, D: int):
        if F % QK or Fs % QK:
            raise ValueError(f"fused MoE needs expert widths that are multiples of {QK}, got {F}, {Fs}")
        W = max(F, Fs)
        self.K, self.F, self.Fs = K, F, Fs
        self.h = (
            np.zeros((K + 1, W), np.float32),
            np.zeros((K + 1, W), np.int8),
            np.zeros((K + 1, W // QK), np.float32),
            np.zeros((K + 1, W // QK), np.float32),
        )
        self.gu = np.empty((K * F // QK + Fs // QK, 2, QK), np.float32)
        self.y = np.empty(D, np.float32)

    def __call__(self, act, kinds, pools, shared, slots, weights) -> np.ndarray:
        """y float32 (D,) for one token: act an ActQ8 of x (1, D); kinds int64 (4,) the formats of
        (gate/up, down, shared gate/up, shared down); pools (gate, up, down) (slots, rows, row_bytes);
        shared (gate, up, down) as one-slot pools (Fs = 0: zero rows); slots int64 (K,), weights float32 (K,).
        Returns a buffer that the next call overwrites."""
        gate, up, down = pools
        sh_g, sh_u, sh_d = shared
        _experts_up(self.h, kinds, (gate, up, sh_g, sh_u), slots, act.q, act.d, act.s, self.gu)
        _experts_down(self.y, kinds, down, sh_d, slots, weights, self.h, self.F // QK, self.Fs // QK)
        return self.y


_FUSED_KINDS = {GGMLType.Q8_0: KIND_Q8_0, GGMLType.Q4_0: KIND_Q4_0}


def plan(gate: Tensor, up: Tensor, down: Tensor, shared) -> tuple[np.ndarray, tuple] | None:
    """(kinds, shared pools) for this kernel, from stacked expert tensors (E, rows, cols) and the shared
    experts (a DenseWeights or None); None when a format has no integer dot product here."""
    parts = [gate, up, down] + ([shared.gate, shared.up, shared.down] if shared is not None else [])
    if any(t.qtype not in _FUSED_KINDS or t.shape[-1] % QK for t in parts) or gate.qtype != up.qtype:
        return None
    if shared is not None and shared.gate.qtype != shared.up.qtype:
        return None
    kinds = [_FUSED_KINDS[t.qtype] for t in parts[1:3]]
    if shared is None:  # zero-row pools: region 1 gets no shared tasks, region 2 no shared row
        pools = (np.zeros((1, 0) + gate.data.shape[2:], np.uint8),) * 2 + (np.zeros((1, down.shape[1], 0), np.uint8),)
        return np.array(kinds * 2, np.int64), pools
    kinds += [_FUSED_KINDS[shared.up.qtype], _FUSED_KINDS[shared.down.qtype]]
    return np.array(kinds, np.int64), (shared.gate.data[None], shared.up.data[None], shared.down.data[None])


_local = threading.local()  # per Python thread: activation buffers and one FusedMoE per layer shape


def moe_token(x: np.ndarray, kinds, pools, shared, slots, weights) -> np.ndarray:
    """y float32 (D,) of one token x float32 (D,): see FusedMoE.__call__ (kinds, shared from plan())."""
    gate, _, down = pools
    key = (slots.size, gate.shape[1], shared[0].shape[1], down.shape[1])
    spaces = _local.__dict__.setdefault("spaces", {})
    if key not in spaces:
        spaces[key] = FusedMoE(*key)
    act = _local.__dict__.setdefault("act", ActQ8())
    return spaces[key](act.quantize(x), kinds, pools, shared, slots, weights).copy()
