"""The one frozen model configuration, built from GGUF metadata alone (llama.cpp `deepseek2` keys)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARCH = "deepseek2"
GATING = {1: "softmax", 2: "sigmoid"}  # deepseek2.expert_gating_func


class ConfigError(ValueError):
    """Metadata the runtime cannot use; the message names the key (load() prefixes the file)."""


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    n_vocab: int
    n_embd: int  # D
    n_layer: int  # decoder blocks (MTP blocks excluded)
    n_ctx_train: int
    n_ff: int  # dense FFN width
    rms_eps: float
    # mla
    n_head: int  # H
    q_lora_rank: int  # 0: one attn_q projection (V2-Lite, Moonlight)
    kv_lora_rank: int  # C
    qk_nope_head_dim: int  # dn
    qk_rope_head_dim: int  # dr
    v_head_dim: int  # dv
    # rope
    rope_theta: float
    rope_scaling: str  # "none" or "yarn"
    rope_factor: float
    rope_orig_ctx: int
    mscale_all_dim: float
    # moe
    n_dense_lead: int
    n_expert: int  # E (0: dense model)
    n_expert_used: int  # K
    n_expert_shared: int
    n_ff_exp: int
    n_group: int
    n_group_used: int
    gating: str  # "softmax" | "sigmoid"
    expert_weights_norm: bool
    expert_weights_scale: float
    # tokens
    bos_id: int | None
    eos_id: int | None
    # HF and the official code build q_a/kv_a layernorms with eps 1e-6 whatever rms_norm_eps says.
    lora_norm_eps: float = 1e-6
    # llama.cpp's deepseek2 ignores the GGUF beta keys and always uses these.
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 times the YaRN mscale squared (HF `DeepseekV3Attention`)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling == "yarn" and self.mscale_all_dim and self.rope_factor > 1:
            m = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_expert > 0 and layer >= self.n_dense_lead

    @classmethod
    def from_gguf(cls, kv: dict) -> "ModelConfig":
        """Every key is type- and range-checked: a hostile file gets a one-line ConfigError naming the key."""
        m = _Meta(kv)
        arch = m.text("general.architecture")
        if arch != ARCH:
            raise ConfigError(f"unsupported architecture {arch!r:.60} (expected {ARCH!r})")
        n_ctx = m.int("context_length", lo=1)
        cfg = cls(**_sizes(m, n_ctx), **_mla(m), **_rope(m, n_ctx), **_moe(m), **_tokens(m))
        _check(cfg)
        return cfg


SIZE_MAX = (1 << 32) - 1  # sizes are UINT32 in files written by llama.cpp and by us
_MISSING = object()


def _show(v) -> str:
    """A short one-line description of a metadata value for error messages."""
    if isinstance(v, (list, np.ndarray)):
        return f"an array of {len(v)}"
    text = repr(v)
    return f"{type(v).__name__} {text[:40] + '...' if len(text) > 40 else text}"


class _Meta:
    """Typed reads of metadata keys (relative to `deepseek2.` unless they start with tokenizer. or
    general.): the value must have the type the runtime expects and lie in range, or a ConfigError
    names the key. Python ints/floats/bools/strs are what GGUFFile makes of the GGUF scalar types."""

    def __init__(self, kv: dict):
        self.kv = kv

    def _get(self, key: str, default):
        full = key if key.startswith(("tokenizer.", "general.")) else f"{ARCH}.{key}"
        value = self.kv.get(full, default)
        if value is _MISSING:
            raise ConfigError(f"missing metadata key {full}")
        return full, value

    def int(self, key: str, default=_MISSING, lo: int = 0, hi: int = SIZE_MAX) -> int:
        full, v = self._get(key, default)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{full}: expected an integer, got {_show(v)}")
        if not lo <= v <= hi:
            raise ConfigError(f"{full}: {v} is out of range {lo}..{hi}")
        return int(v)

    def real(self, key: str, default=_MISSING, lo: float = -math.inf, hi: float = math.inf) -> float:
        full, v = self._get(key, default)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{full}: expected a number, got {_show(v)}")
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ConfigError(f"{full}: {v} is out of range {lo}..{hi}")
        return float(v)

    def text(self, key: str, default=_MISSING) -> str:
        full, v = self._get(key, default)
        if not isinstance(v, str):
            raise ConfigError(f"{full}: expected a string, got {_show(v)}")
        return v

    def flag(self, key: str, default=_MISSING) -> bool:
        full, v = self._get(key, default)
        if not isinstance(v, (bool, np.bool_)):
            raise ConfigError(f"{full}: expected a bool, got {_show(v)}")
        return bool(v)


def _sizes(m: _Meta, n_ctx: int) -> dict:
    n_blocks = m.int("block_count", lo=1)
    return dict(
        n_embd=m.int("embedding_length", lo=1),
        # MTP blocks sit after the decoder blocks and are not run.
        n_layer=n_blocks - m.int("nextn_predict_layers", 0, hi=n_blocks - 1),
        n_ctx_train=n_ctx,
        n_ff=m.int("feed_forward_length", 0),
        rms_eps=m.real("attention.layer_norm_rms_epsilon", lo=1e-30, hi=1.0),
    )


def _mla(m: _Meta) -> dict:
    rope = m.int("rope.dimension_count", lo=2)
    # MLA files store the per-head sizes in *_mla keys; legacy files in key/value_length. 0 = unset.
    key_len = m.int("attention.key_length_mla", 0) or m.int("attention.key_length", lo=1)
    val_len = m.int("attention.value_length_mla", 0) or m.int("attention.value_length", lo=1)
    return dict(
        n_head=m.int("attention.head_count", lo=1),
        q_lora_rank=m.int("attention.q_lora_rank", 0),
        kv_lora_rank=m.int("attention.kv_lora_rank", lo=1),
        qk_nope_head_dim=key_len - rope,
        qk_rope_head_dim=rope,
        v_head_dim=val_len,
    )


def _rope(m: _Meta, n_ctx: int) -> dict:
    scaling = m.text("rope.scaling.type", "none")
    if scaling not in ("none", "yarn"):
        raise ConfigError(f"{ARCH}.rope.scaling.type: unsupported value {scaling!r} (expected 'none' or 'yarn')")
    factor = m.real("rope.scaling.factor", 0.0, lo=0.0, hi=1e6)
    if 0 < factor < 1:  # a subnormal factor overflows 1 / (factor * freq) into NaN (fuzz finding)
        raise ConfigError(f"{ARCH}.rope.scaling.factor: {factor} is below 1 (0 means unset)")
    return dict(
        # theta > 1: YaRN divides by log(theta). The upper bounds keep the float32 frequency tables
        # finite (a factor of 1e38 overflowed them into NaN logits blamed on layer 0; fuzz finding).
        rope_theta=m.real("rope.freq_base", 10000.0, lo=1.0 + 1e-6, hi=1e12),
        rope_scaling=scaling,
        rope_factor=factor or 1.0,  # 0 = unset, as llama.cpp
        rope_orig_ctx=m.int("rope.scaling.original_context_length", n_ctx, lo=1),
        # The converter writes 0.1 * mscale_all_dim (llama.cpp divides it back on load).
        mscale_all_dim=m.real("rope.scaling.yarn_log_multiplier", 0.0, lo=0.0, hi=100.0) / 0.1,
    )


def _moe(m: _Meta) -> dict:
    gating = m.int("expert_gating_func", 1, hi=max(GATING))
    return dict(
        n_dense_lead=m.int("leading_dense_block_count", 0),
        n_expert=m.int("expert_count", 0),
        n_expert_used=m.int("expert_used_count", 0),
        n_expert_shared=m.int("expert_shared_count", 0),
        n_ff_exp=m.int("expert_feed_forward_length", 0),
        n_group=max(1, m.int("expert_group_count", 1)),
        n_group_used=max(1, m.int("expert_group_used_count", 1)),
        gating=GATING.get(gating, "softmax"),  # 0 (none): old V2 files, softmax as in llama.cpp
        expert_weights_norm=m.flag("expert_weights_norm", False),
        expert_weights_scale=m.real("expert_weights_scale", 1.0, lo=0.0, hi=1e6) or 1.0,
    )


def _tokens(m: _Meta) -> dict:
    tokens = m.kv.get("tokenizer.ggml.tokens")
    if tokens is None:
        n_vocab = m.int("vocab_size", lo=1)
    elif not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ConfigError(f"tokenizer.ggml.tokens: expected a non-empty array of strings, got {_show(tokens)}")
    else:
        n_vocab = len(tokens)
    bos = m.kv.get("tokenizer.ggml.bos_token_id")
    eos = m.kv.get("tokenizer.ggml.eos_token_id")
    return dict(
        n_vocab=n_vocab,
        bos_id=None if bos is None else m.int("tokenizer.ggml.bos_token_id", hi=n_vocab - 1),
        eos_id=None if eos is None else m.int("tokenizer.ggml.eos_token_id", hi=n_vocab - 1),
    )


def _check(c: ModelConfig) -> None:
    """Cross-key consistency that single-key ranges cannot express."""
    k = f"{ARCH}."
    problems = []
    if c.qk_rope_head_dim % 2:
        problems.append(f"{k}rope.dimension_count {c.qk_rope_head_dim} is odd (rope turns pairs)")
    if c.qk_nope_head_dim < 1:
        problems.append(f"{k}attention.key_length(_mla) must exceed rope.dimension_count {c.qk_rope_head_dim}")
    if (c.n_expert == 0 or c.n_dense_lead > 0) and c.n_ff < 1:
        problems.append(f"{k}feed_forward_length must be positive for dense blocks")
    if c.n_expert:
        problems += _moe_problems(c, k)
    if problems:
        raise ConfigError("; ".join(problems))


def _moe_problems(c: ModelConfig, k: str) -> list[str]:
    out = []
    if not 1 <= c.n_expert_used <= c.n_expert:
        out.append(f"{k}expert_used_count {c.n_expert_used} not in 1..expert_count {c.n_expert}")
    if c.n_ff_exp < 1:
        out.append(f"{k}expert_feed_forward_length must be positive")
    if c.n_expert % c.n_group:
        out.append(f"{k}expert_group_count {c.n_group} does not divide expert_count {c.n_expert}")
    elif c.n_group_used > c.n_group:
        out.append(f"{k}expert_group_used_count {c.n_group_used} exceeds expert_group_count {c.n_group}")
    elif c.n_group_used * (c.n_expert // c.n_group) < c.n_expert_used <= c.n_expert:
        out.append(f"{k}expert_group_used_count {c.n_group_used} leaves fewer than {c.n_expert_used} experts to pick")
    return out
