"""Multi-head latent attention (deepseek-math.md §4), naive and weight-absorbed forms.

Shapes: T new tokens, L = cached + new tokens, H heads, N nope dim, R rope dim, V value dim,
C kv_lora_rank. The cache row of a token is [c (C) ; k_pe (R)], c normalized, k_pe rotated.

absorbed (decode, and prefill of MLA files):
    q_lat_h = W_UK_h^T q_nope_h                    (C)   = linear(q_nope_h, attn_k_b[h])
    s_h(u)  = scale * ([q_lat_h ; q_pe_h] . [c(u) ; k_pe(u)])
    o_lat_h = sum_u softmax(s_h)(u) c(u)           (C)
    o_h     = W_UV_h o_lat_h                       (V)   = linear(o_lat_h, attn_v_b[h])
naive (prefill of legacy files): expand k_nope_h(u) = W_UK_h c(u), v_h(u) = W_UV_h c(u) and run MHA.
Both equal in exact arithmetic; tests/test_mla.py checks they agree in float32.
"""

from __future__ import annotations

import numpy as np

from r1cpu.kernels_numba import mla_decode
from r1cpu.kernels_numba.attention import mla_attend
from r1cpu.quant.registry import GGMLType, dequantize
from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.kv_cache import MLACache
from r1cpu.runtime.norm import rmsnorm
from r1cpu.runtime.rope import apply_rope
from r1cpu.runtime.weights import AttnWeights, linear

SCORE_BUDGET = 1 << 22  # float32 scores held at once (16 MiB): prefill runs in query chunks


def project_q(x: np.ndarray, w: AttnWeights, cfg: ModelConfig) -> np.ndarray:
    """x (T, D) -> q (T, H, N+R), rope dims not yet rotated."""
    if w.q is not None:
        q = linear(x, w.q)
    else:
        q = linear(rmsnorm(linear(x, w.q_a), w.q_a_norm, cfg.lora_norm_eps), w.q_b)
    return q.reshape(x.shape[0], cfg.n_head, cfg.qk_head_dim)


def project_kv(x: np.ndarray, w: AttnWeights, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """x (T, D) -> c (T, C) normalized latent, k_pe (T, R) not normalized, not yet rotated."""
    kv = linear(x, w.kv_a_mqa)  # (T, C+R)
    C = cfg.kv_lora_rank
    return rmsnorm(kv[:, :C], w.kv_a_norm, cfg.lora_norm_eps), np.ascontiguousarray(kv[:, C:])


def _causal_softmax(s: np.ndarray, qpos: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (keys 0..L-1) in place, masking keys after the query position.

    s (..., L) float32; qpos int, broadcastable to s.shape[:-1] (position of each query row).
    """
    L = s.shape[-1]
    if np.min(qpos) < L - 1:  # some key lies in a query's future
        np.copyto(s, -np.inf, where=np.arange(L) > np.asarray(qpos)[..., None])
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def absorb_q(q_nope: np.ndarray, k_b_heads) -> np.ndarray:
    """q_nope (T, H, N) -> q_lat (T, H, C), one linear per head with attn_k_b[h] (C, N)."""
    T, H, _ = q_nope.shape
    out = np.empty((T, H, k_b_heads[0].shape[0]), dtype=np.float32)
    for h, w in enumerate(k_b_heads):
        out[:, h] = linear(np.ascontiguousarray(q_nope[:, h]), w)
    return out


def absorb_out(o_lat: np.ndarray, v_b_heads) -> np.ndarray:
    """o_lat (T, H, C) -> o (T, H, V), one linear per head with attn_v_b[h] (V, C)."""
    T, H, _ = o_lat.shape
    out = np.empty((T, H, v_b_heads[0].shape[0]), dtype=np.float32)
    for h, w in enumerate(v_b_heads):
        out[:, h] = linear(np.ascontiguousarray(o_lat[:, h]), w)
    return out


def attend_absorbed(q_lat: np.ndarray, q_pe: np.ndarray, kv: np.ndarray, scale: float, first_pos: int) -> np.ndarray:
    """q_lat (T, H, C), q_pe (T, H, R) rotated, kv (L, C+R) cache rows -> o_lat (T, H, C)."""
    T, H, C = q_lat.shape
    q = np.concatenate([q_lat, q_pe], axis=-1)  # (T, H, C+R): one dot product against [c ; k_pe]
    out = np.empty((T, H, C), dtype=np.float32)
    step = max(1, SCORE_BUDGET // (H * kv.shape[0]))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)  # queries t0..t1-1 see keys up to first_pos + t1 - 1
        mla_attend(q[t0:t1], kv[: first_pos + t1], C, scale, first_pos + t0, out=out[t0:t1])
    return out


def expand_kv(c: np.ndarray, w: AttnWeights, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """c (L, C) -> k_nope (L, H, N), v (L, H, V): the naive form's per-head keys and values."""
    L, H, N, V = c.shape[0], cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim
    if w.kv_b is not None:  # legacy layout: one matmul, rows per head [k_nope ; v]
        kv = linear(c, w.kv_b).reshape(L, H, N + V)
        return kv[..., :N], kv[..., N:]
    # MLA layout: attn_k_b stores W_UK transposed; the expansion needs it as (N, C) -> dequantize.
    k_b = w.k_b.data if w.k_b.qtype == GGMLType.F32 else dequantize(w.k_b.data, w.k_b.qtype)
    k_nope = np.einsum("lc,hcn->lhn", c, np.asarray(k_b, dtype=np.float32).reshape(H, -1, N))
    v = np.stack([linear(c, v_b) for v_b in w.v_b_heads], axis=1)
    return k_nope.astype(np.float32), v


def attend_naive(q_nope, q_pe, k_nope, k_pe, v, scale: float, first_pos: int) -> np.ndarray:
    """q_nope (T,H,N), q_pe (T,H,R), k_nope (L,H,N), k_pe (L,R), v (L,H,V) -> o (T,H,V)."""
    s = q_nope.transpose(1, 0, 2) @ k_nope.transpose(1, 2, 0)  # (H, T, L)
    s += q_pe.transpose(1, 0, 2) @ k_pe.T
    s *= np.float32(scale)
    p = _causal_softmax(s, first_pos + np.arange(s.shape[1])[None, :])  # rows (H, T)
    return (p @ v.transpose(1, 0, 2)).transpose(1, 0, 2)  # (T, H, V)


def attention(
    x: np.ndarray,
    w: AttnWeights,
    cfg: ModelConfig,
    cos: np.ndarray,
    sin: np.ndarray,
    cache: MLACache,
    layer: int,
    form: str = "absorbed",
) -> np.ndarray:
    """x (T, D) normed hidden states of tokens at positions cache.length + i -> (T, D).

    Writes this layer's cache rows for the T tokens; the caller advances the cache after the
    last layer. cos/sin (T, R/2) are the rope tables for those positions.
    """
    T, N, C = x.shape[0], cfg.qk_nope_head_dim, cfg.kv_lora_rank
    first = cache.length
    q = project_q(x, w, cfg)  # (T, H, N+R)
    q_nope, q_pe = q[..., :N], apply_rope(q[..., N:], cos, sin)
    c, k_pe = project_kv(x, w, cfg)
    kv = cache.write(layer, c, apply_rope(k_pe, cos, sin))  # (L, C+R)
    if form == "naive":
        k_nope, v = expand_kv(kv[:, :C], w, cfg)
        o = attend_naive(q_nope, q_pe, k_nope, kv[:, C:], v, cfg.softmax_scale, first)
    elif T == 1 and w.absorb is not None:  # decode: every head in one kernel over the latent cache
        o = mla_decode.decode(w.absorb, q_nope[0], q_pe[0], kv, cfg.softmax_scale)
    else:
        o_lat = attend_absorbed(absorb_q(q_nope, w.k_b_heads), q_pe, kv, cfg.softmax_scale, first)
        o = absorb_out(o_lat, w.v_b_heads)
    return linear(np.ascontiguousarray(o.reshape(T, -1)), w.output)
