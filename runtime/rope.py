"""Rotary embedding for DeepSeek MLA: YaRN frequencies (as HF computes them) and interleaved pairs.

The rope dims of q_pe / k_pe are stored as interleaved pairs: pair i = (x[2i], x[2i+1]) turns by
angle pos * inv_freq[i] (deepseek-math.md §3.3). R = qk_rope_head_dim, R/2 frequencies.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from r1cpu.runtime.config import ModelConfig


def _pos_freqs(theta: float, dim: int) -> np.ndarray:
    """theta^(2i/dim) in fp32. The power in float64 then one rounding to fp32 reproduces torch CPU
    bit for bit (numpy's float32 ** float32 differs in a few entries)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)  # fp32, as torch
    return (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """1 / theta^(2i/dim) -> float32[dim/2] (plain RoPE)."""
    return np.float32(1.0) / _pos_freqs(theta, dim)


def _correction_dim(n_rot: float, dim: int, theta: float, orig_ctx: int) -> float:
    return dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(
    theta: float, dim: int, factor: float, orig_ctx: int, beta_fast: float = 32.0, beta_slow: float = 1.0
) -> np.ndarray:
    """HF `_compute_yarn_parameters` in fp32: keep the high frequencies, divide the low ones by
    `factor`, blend linearly in between (ramp over [low, high])."""
    pos_freqs = _pos_freqs(theta, dim)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    low = max(math.floor(_correction_dim(beta_fast, dim, theta, orig_ctx)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, theta, orig_ctx)), dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid dividing by zero
    ramp = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    extrap_factor = np.float32(1.0) - np.clip(ramp, 0, 1).astype(np.float32)
    one = np.float32(1.0)
    return (interpolation * (one - extrap_factor) + extrapolation * extrap_factor).astype(np.float32)


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """float32[R/2] for this model (plain RoPE unless the GGUF says yarn)."""
    if cfg.rope_scaling == "yarn":
        return yarn_inv_freq(
            cfg.rope_theta, cfg.qk_rope_head_dim, cfg.rope_factor, cfg.rope_orig_ctx,
            cfg.yarn_beta_fast, cfg.yarn_beta_slow,
        )  # fmt: skip
    return base_inv_freq(cfg.rope_theta, cfg.qk_rope_head_dim)


def attention_factor(cfg: ModelConfig) -> float:
    """HF multiplies cos/sin by this. It is mscale/mscale_all_dim = 1 for every DeepSeek release
    (GGUF keeps only mscale_all_dim; llama.cpp assumes mscale == mscale_all_dim). Without
    mscale_all_dim HF falls back to 0.1 ln(factor) + 1."""
    if cfg.rope_scaling != "yarn" or cfg.mscale_all_dim or cfg.rope_factor <= 1:
        return 1.0
    return 0.1 * math.log(cfg.rope_factor) + 1.0


class Rope:
    """cos/sin tables computed per call for the positions asked (cheap: T x R/2)."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq = inv_freq(cfg)  # (R/2,)
        self.scale = attention_factor(cfg)

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions int (T,) -> cos, sin float32 (T, R/2). angle = fl32(pos * inv_freq) like torch."""
        angle = np.asarray(positions, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        cos = np.cos(angle.astype(np.float64)) * self.scale
        sin = np.sin(angle.astype(np.float64)) * self.scale
        return cos.astype(np.float32), sin.astype(np.float32)


@njit(cache=True)
def _rope(out, x, cos, sin):
    # x, out (T, M, R), x any strides; cos/sin (T, R/2). Products then one subtraction/addition,
    # each rounded to float32, as the numpy expression it replaced (no fused multiply-add).
    T, M, R = x.shape
    for t in range(T):
        for m in range(M):
            for i in range(R // 2):
                e, o = x[t, m, 2 * i], x[t, m, 2 * i + 1]
                out[t, m, 2 * i] = e * cos[t, i] - o * sin[t, i]
                out[t, m, 2 * i + 1] = e * sin[t, i] + o * cos[t, i]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x float32 (T, ..., R) with interleaved pairs; cos/sin (T, R/2). Returns a new array.

    out[2i]   = x[2i] cos_i - x[2i+1] sin_i
    out[2i+1] = x[2i] sin_i + x[2i+1] cos_i
    """
    T, R = x.shape[0], x.shape[-1]
    if cos.shape != (T, R // 2) or sin.shape != cos.shape or R % 2:
        raise ValueError(f"apply_rope: x {x.shape} and tables {cos.shape}, {sin.shape} disagree")
    x3 = np.asarray(x, dtype=np.float32).reshape(T, -1, R)  # a view for q's rope slice and k_pe
    out = np.empty(x3.shape, np.float32)
    _rope(out, x3, np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32))
    return out.reshape(x.shape)
