"""The MoE FFN of one token in two parallel regions: every routed expert and the shared experts at once.

    h_k  = silu(gate[s_k] x) * up[s_k] x        k = 0..K-1 routed (pool slot s_k), and the shared h_sh
    y    = sum_k w_k down[s_k] h_k + down_sh h_sh

Weights come as stacked pools uint8 (slots, rows, row_bytes): without an expert cache the pools are
the file's ffn_*_exps tensors and slot = expert id (MoEWeights.resolve). Shapes: D n_embd, F expert
width, Fs shared width, K experts used.

Region 1 runs tasks of 32 gate/up rows (one activation block) of one expert, over all experts: each
task writes its 32 values of h and quantizes them as one Q8 block, so region 2 reads h as int8.
Region 2 runs chunks of one expert's down rows into a row per expert, and a serial pass sums them with
the routing weights. (Summing the K experts inside each output row instead read 7 short interleaved
streams: 10 GB/s a core against 14 for one stream at a time.)

A batch of tokens (prefill, `moe_batch`) is one region whose tasks are whole experts with all their
tokens, so each expert's weights are read once per batch: few tokens multiply 8-bit activations row by
row; more take 8-bit tiles of 8 tokens (Q4_0, token_tiles.py) or decode the expert into a float32
tile for single-threaded sgemm.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import get_thread_id, njit, parallel_chunksize, prange

from r1cpu.kernels_numba import matmul, threads
from r1cpu.kernels_numba.actquant import LANES, QK, ActQ8, quantize_block
from r1cpu.kernels_numba.intrinsics import KIND_Q4_0, KIND_Q8_0, dot_row
from r1cpu.kernels_numba.matmul import _NO_TRANS, _ROW_MAJOR, _TRANS, _decode_row
from r1cpu.kernels_numba.token_tiles import GROUPS, TILE, quantize_tiles, tiles_product
from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor

CHUNK_ROWS = 16  # output rows per region-2 task


@njit(cache=True, inline="always")
def _silu_mul_block(h, g, u):
    for j in range(QK):
        h[j] = g[j] / (np.float32(1.0) + np.exp(-g[j])) * u[j]


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
        quantize_block(hq[k], hd[k], hs[k], hf[k], b * QK, b)


@njit(cache=True, inline="always")
def _down_row(kind, pool, slot, r, hq, hd, hs, k, nb):
    o = slot * pool.strides[0] + r * pool.strides[1]
    return dot_row(kind, pool, o, hq, k * hq.shape[1], hd, hs, k * hd.shape[1], nb)


@njit(cache=True, parallel=True)
def _experts_down(part, kinds, d_pool, sh_d, slots, h, nb, nb_sh):
    # part float32 (K+1, D): row k = d_pool[slots[k]] h_k, row K = sh_d[0] h_K (nb_sh = 0: none).
    # A task is a run of one expert's rows, so every task streams consecutive weight rows.
    _, hq, hd, hs = h
    K, D = slots.size, part.shape[1]
    per_expert = (D + CHUNK_ROWS - 1) // CHUNK_ROWS
    for task in prange((K + (nb_sh > 0)) * per_expert):
        k, c = task // per_expert, task % per_expert
        for r in range(c * CHUNK_ROWS, min(D, (c + 1) * CHUNK_ROWS)):
            if k < K:
                part[k, r] = _down_row(kinds[1], d_pool, slots[k], r, hq, hd, hs, k, nb)
            else:
                part[k, r] = _down_row(kinds[3], sh_d, 0, r, hq, hd, hs, K, nb_sh)


@njit(cache=True)
def _weighted_sum(y, part, weights, n_shared_rows):
    # y (D,) = sum_k weights[k] part[k] + the shared row (part[K]) if there is one
    K = weights.size
    for r in range(y.size):
        acc = part[K, r] if n_shared_rows else np.float32(0.0)
        for k in range(K):
            acc += weights[k] * part[k, r]
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
            np.zeros((K + 1, W // QK * LANES), np.int32),
        )
        self.gu = np.empty((K * F // QK + Fs // QK, 2, QK), np.float32)
        self.part = np.empty((K + 1, D), np.float32)
        self.y = np.empty(D, np.float32)

    def __call__(self, act, kinds, pools, shared, slots, weights) -> np.ndarray:
        """y float32 (D,) for one token: act an ActQ8 of x (1, D); kinds int64 (4,) the formats of
        (gate/up, down, shared gate/up, shared down); pools (gate, up, down) (slots, rows, row_bytes);
        shared (gate, up, down) as one-slot pools (Fs = 0: zero rows); slots int64 (K,), weights float32 (K,).
        Returns a buffer that the next call overwrites."""
        gate, up, down = pools
        sh_g, sh_u, sh_d = shared
        _experts_up(self.h, kinds, (gate, up, sh_g, sh_u), slots, act.q, act.d, act.s, self.gu)
        _experts_down(self.part, kinds, down, sh_d, slots, self.h, self.F // QK, self.Fs // QK)
        _weighted_sum(self.y, self.part[: slots.size + 1], weights, self.Fs)
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


# ---- a batch of tokens (prefill): each thread runs whole experts on their tokens ---------------


@njit(cache=True, inline="always")
def _decoded_product(sgemm, out, x, pool, slot, kind, w_buf):
    # out (T_e, rows) = x (T_e, cols) @ pool[slot].T, the slot's rows decoded into w_buf first
    rows, cols = out.shape[1], x.shape[1]
    w = w_buf[: rows * cols].reshape((rows, cols))
    for r in range(rows):
        _decode_row(kind, w[r], pool[slot, r])
    sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, x.shape[0], rows, cols, np.float32(1.0), x.ctypes, cols,
          w.ctypes, cols, np.float32(0.0), out.ctypes, rows)  # fmt: skip


@njit(cache=True, inline="always")
def _quantized_product(out, xq, xd, xs, pool, slot, kind):
    # out (n, rows) = 8-bit activations (n, cols) times pool[slot] rows, each weight row read once
    n, rows = out.shape
    cols = xq.shape[1]
    for r in range(rows):
        o = slot * pool.strides[0] + r * pool.strides[1]
        for i in range(n):
            out[i, r] = dot_row(kind, pool, o, xq, i * cols, xd, xs, i * (cols // QK), cols // QK)


@njit(cache=True, inline="always")
def _quantize_rows(q, d, s, x):
    for i in range(x.shape[0]):
        for b in range(x.shape[1] // QK):
            quantize_block(q[i], d[i], s[i], x[i], b * QK, b)


@njit(cache=True, inline="always")
def _silu_mul_rows(g, u):
    for i in range(g.shape[0]):
        for f in range(g.shape[1]):
            g[i, f] = g[i, f] / (np.float32(1.0) + np.exp(-g[i, f])) * u[i, f]


@njit(cache=True, inline="always")
def _tile_views(bufs, tid, n_tiles, nb):
    # this thread's tile buffers shaped for n_tiles tiles of nb blocks (token_tiles.py layout)
    at = bufs[0][tid][: n_tiles * nb * GROUPS * 4 * TILE].reshape((n_tiles, nb, GROUPS, 4 * TILE))
    ad = bufs[1][tid][: n_tiles * nb * TILE].reshape((n_tiles, nb, TILE))
    ao = bufs[2][tid][: n_tiles * nb * TILE].reshape((n_tiles, nb, TILE))
    return at, ad, ao


@njit(cache=True, inline="always")
def _tiled_ffn(ye, g, u, xe, n, pools, slot, bufs, tid, q, d, s):
    # Q4_0 experts: ye = down(silu(gate xe) * up xe) with token_tiles products; q, d, s one token's scratch
    gate, up, down = pools
    n_tiles, acc = (n + TILE - 1) // TILE, bufs[3][tid]
    at, ad, ao = _tile_views(bufs, tid, n_tiles, xe.shape[1] // QK)
    quantize_tiles(xe, n, at, ad, ao, q, d, s)
    tiles_product(g, n, gate, slot, at, ad, ao, acc)
    tiles_product(u, n, up, slot, at, ad, ao, acc)
    _silu_mul_rows(g, u)
    at, ad, ao = _tile_views(bufs, tid, n_tiles, g.shape[1] // QK)
    quantize_tiles(g, n, at, ad, ao, q, d, s)
    tiles_product(ye, n, down, slot, at, ad, ao, acc)


@njit(cache=True, parallel=True)
def _experts_batch(sgemm, y, x, kinds, pools, slots, starts, token, k_of, weight, scratch, q_max, order, tiles):
    # Expert j runs tokens token[starts[j]:starts[j+1]]; the product for (token t, its k-th choice)
    # lands in y[t, k] (T, K, D), scaled by its routing weight: every (t, k) has one writer.
    # Experts go in `order`, most tokens first, so the last ones left for the threads are short.
    # scratch = (f, q, d, s), per thread: f float32 x rows, gate, up, output and a decoded matrix;
    # q int8, d float32 and s int32 the x and gate rows as 8-bit blocks (actquant.py). Up to q_max
    # tokens an expert multiplies 8-bit activations, reading each weight row once; more tokens take
    # 8-token tiles for Q4_0 experts (token_tiles.py; `tiles` their buffers), else pay for decoding
    # the expert for sgemm.
    gate, up, down = pools
    D, F = x.shape[1], gate.shape[1]
    for o in prange(order.size):
        j = order[o]
        a, n, slot = starts[j], starts[j + 1] - starts[j], slots[j]
        tid = get_thread_id()
        buf, qbuf, dbuf, sbuf = scratch[0][tid], scratch[1][tid], scratch[2][tid], scratch[3][tid]
        cap = qbuf.size // (D + F)  # tokens the scratch holds
        xe = buf[: cap * D].reshape((cap, D))[:n]
        g = buf[cap * D : cap * (D + F)].reshape((cap, F))[:n]
        u = buf[cap * (D + F) : cap * (D + 2 * F)].reshape((cap, F))[:n]
        ye = buf[cap * (D + 2 * F) : cap * (2 * D + 2 * F)].reshape((cap, D))[:n]
        for i in range(n):
            xe[i] = x[token[a + i]]
        if n <= q_max:
            xq, hq = qbuf[: cap * D].reshape((cap, D))[:n], qbuf[cap * D :].reshape((cap, F))[:n]
            nx, nh = cap * D // QK, cap * F // QK
            xd, hd = dbuf[:nx].reshape((cap, D // QK))[:n], dbuf[nx : nx + nh].reshape((cap, F // QK))[:n]
            xs = sbuf[: LANES * nx].reshape((cap, LANES * D // QK))[:n]
            hs = sbuf[LANES * nx : LANES * (nx + nh)].reshape((cap, LANES * F // QK))[:n]
            _quantize_rows(xq, xd, xs, xe)
            _quantized_product(g, xq, xd, xs, gate, slot, kinds[0])
            _quantized_product(u, xq, xd, xs, up, slot, kinds[0])
            _silu_mul_rows(g, u)
            _quantize_rows(hq, hd, hs, g)
            _quantized_product(ye, hq, hd, hs, down, slot, kinds[1])
        elif kinds[0] == KIND_Q4_0 and kinds[1] == KIND_Q4_0:
            _tiled_ffn(ye, g, u, xe, n, pools, slot, tiles, tid, qbuf, dbuf, sbuf)
        else:
            w_buf = buf[cap * (2 * D + 2 * F) :]
            _decoded_product(sgemm, g, xe, gate, slot, kinds[0], w_buf)
            _decoded_product(sgemm, u, xe, up, slot, kinds[0], w_buf)
            _silu_mul_rows(g, u)
            _decoded_product(sgemm, ye, g, down, slot, kinds[1], w_buf)
        for i in range(n):
            out, wt = y[token[a + i], k_of[a + i]], weight[a + i]
            for d in range(D):
                out[d] = wt * ye[i, d]


def batch_supported() -> bool:
    """moe_batch multiplies with cblas_sgemm: False when none was found (callers loop over experts)."""
    return threads.sgemm() is not None


# Tokens an expert needs on average before decoding it for sgemm beats one 8-bit matvec per token
# (k-quants, q_max 0): decoding a 2048 x 1408 expert costs about what 3-4 of its matvecs do here.
DECODE_MIN_TOKENS = 4


def batch_pays(plan: tuple[np.ndarray, int], pairs: int, experts: int) -> bool:
    """Whether moe_batch should run `pairs` (token, expert) choices over `experts` distinct experts:
    always with 8-bit products for few tokens (q_max > 0), else when experts get enough tokens."""
    return batch_supported() and (plan[1] > 0 or pairs >= DECODE_MIN_TOKENS * experts)


# Tokens up to which Q4_0 experts use row products: a tile costs ~3 row products, whatever its fill.
ROW_MAX_T = 2


def batch_plan(gate: Tensor, up: Tensor, down: Tensor) -> tuple[np.ndarray, int] | None:
    """(kinds of gate/up and down, q_max) for moe_batch, or None when a type has no row decoder. Few
    tokens take 8-bit products only where gate, up and down all have them (Q8_0 / Q4_0, q_max tokens);
    the k-quants decode every expert they run (q_max 0). All-Q4_0 experts take 8-bit token tiles
    past ROW_MAX_T tokens, at twice sgemm's rate, so rows serve only the fewest."""
    codecs = [matmul.CODECS.get(t.qtype) for t in (gate, up, down)]
    if any(c is None or c.kind is None or c.dtype is not np.uint8 for c in codecs) or gate.qtype != up.qtype:
        return None  # float types keep the per-expert path (their pools are not bytes; F32 needs no decoding)
    q_max = matmul.QUANT_MAX_T if all(t.qtype in _FUSED_KINDS for t in (gate, down)) else 0
    if gate.qtype == down.qtype == GGMLType.Q4_0:
        q_max = ROW_MAX_T
    return np.array([codecs[0].kind, codecs[2].kind], np.int64), q_max


def moe_batch(x: np.ndarray, plan: tuple[np.ndarray, int], pools, slots: np.ndarray, idx: np.ndarray,
              weights: np.ndarray, experts: np.ndarray) -> np.ndarray:  # fmt: skip
    """Sum over k of weights[t, k] * expert idx[t, k](x[t]), restricted to the `experts` given (each
    with its pool slot in `slots`): float32 (T, D). plan from batch_plan(); x (T, D); idx (T, K) int;
    weights (T, K) float32."""
    kinds, q_max = plan
    T, D = x.shape
    F = pools[0].shape[1]
    t_of, k_of = np.nonzero(np.isin(idx, experts))  # (token, choice) pairs these experts serve
    order = np.argsort(idx[t_of, k_of], kind="stable")
    t_of, k_of = t_of[order], k_of[order]
    counts = np.bincount(np.searchsorted(experts, idx[t_of, k_of]), minlength=experts.size)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cap, n_thr = int(counts.max(initial=1)), threads.get_threads()
    blocks = cap * (D + F) // QK
    scratch = (np.empty((n_thr, cap * (2 * D + 2 * F) + F * D), np.float32), np.empty((n_thr, cap * (D + F)), np.int8),
               np.empty((n_thr, blocks), np.float32), np.empty((n_thr, LANES * blocks), np.int32))  # fmt: skip
    y = np.zeros((T, idx.shape[1], D), np.float32)
    tile_blocks = -(-cap // TILE) * max(D, F) // QK if kinds[0] == kinds[1] == KIND_Q4_0 else 0
    tiles = (np.empty((n_thr, tile_blocks * GROUPS * 4 * TILE), np.int8), np.empty((n_thr, tile_blocks * TILE), np.float32),
             np.empty((n_thr, tile_blocks * TILE), np.int32), np.empty((n_thr, 2 * TILE), np.float32))  # fmt: skip
    # Experts cost from a few matvecs to hundreds of tokens' sgemm: with prange's default equal split a
    # thread could end up with the heavy ones; one expert per chunk, heaviest first, balances them.
    with parallel_chunksize(1):
        _experts_batch(threads.sgemm(), y, x, kinds, pools, np.asarray(slots, np.int64), starts, t_of.astype(np.int64),
                       k_of.astype(np.int64), weights[t_of, k_of].astype(np.float32), scratch, q_max,
                       np.argsort(-counts, kind="stable"), tiles)  # fmt: skip
    return y.sum(axis=1)
