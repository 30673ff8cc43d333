"""The one frozen model configuration, built from GGUF metadata alone (llama.cpp `deepseek2` keys)."""

from __future__ import annotations

import math
from dataclasses import dataclass

ARCH = "deepseek2"
GATING = {1: "softmax", 2: "sigmoid"}  # deepseek2.expert_gating_func


class ConfigError(ValueError):
    pass


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
        arch = kv.get("general.architecture")
        if arch != ARCH:
            raise ConfigError(f"unsupported architecture {arch!r} (expected {ARCH!r})")

        def get(key, default=None, required=False):
            full = f"{ARCH}.{key}"
            if full not in kv:
                if required:
                    raise ConfigError(f"missing metadata key {full}")
                return default
            return kv[full]

        n_head = int(get("attention.head_count", required=True))
        rope = int(get("rope.dimension_count", required=True))
        # MLA files store the per-head sizes in *_mla keys; legacy files in key/value_length.
        key_len = get("attention.key_length_mla") or get("attention.key_length", required=True)
        val_len = get("attention.value_length_mla") or get("attention.value_length", required=True)
        scaling = str(get("rope.scaling.type", "none"))
        log_mul = float(get("rope.scaling.yarn_log_multiplier", 0.0))
        tokens = kv.get("tokenizer.ggml.tokens")
        return cls(
            n_vocab=len(tokens) if tokens is not None else int(get("vocab_size", required=True)),
            n_embd=int(get("embedding_length", required=True)),
            n_layer=int(get("block_count", required=True)) - int(get("nextn_predict_layers", 0)),
            n_ctx_train=int(get("context_length", required=True)),
            n_ff=int(get("feed_forward_length", 0)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", required=True)),
            n_head=n_head,
            q_lora_rank=int(get("attention.q_lora_rank", 0) or 0),
            kv_lora_rank=int(get("attention.kv_lora_rank", required=True)),
            qk_nope_head_dim=int(key_len) - rope,
            qk_rope_head_dim=rope,
            v_head_dim=int(val_len),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling if scaling == "yarn" else "none",
            rope_factor=float(get("rope.scaling.factor", 1.0) or 1.0),
            rope_orig_ctx=int(get("rope.scaling.original_context_length", get("context_length"))),
            # The converter writes 0.1 * mscale_all_dim (llama.cpp divides it back on load).
            mscale_all_dim=log_mul / 0.1,
            n_dense_lead=int(get("leading_dense_block_count", 0)),
            n_expert=int(get("expert_count", 0)),
            n_expert_used=int(get("expert_used_count", 0)),
            n_expert_shared=int(get("expert_shared_count", 0)),
            n_ff_exp=int(get("expert_feed_forward_length", 0)),
            n_group=max(1, int(get("expert_group_count", 1))),
            n_group_used=max(1, int(get("expert_group_used_count", 1))),
            gating=GATING.get(int(get("expert_gating_func", 1)), "softmax"),
            expert_weights_norm=bool(get("expert_weights_norm", False)),
            expert_weights_scale=float(get("expert_weights_scale", 1.0) or 1.0),
            bos_id=_opt_int(kv.get("tokenizer.ggml.bos_token_id")),
            eos_id=_opt_int(kv.get("tokenizer.ggml.eos_token_id")),
        )


def _opt_int(v):
    return None if v is None else int(v)
