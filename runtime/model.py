"""The DeepSeek-V2/V3 forward pass over a deepseek2 GGUF, float32 throughout.

Shape legend (used in every comment of runtime/):
    T tokens in the call        L tokens in the cache after the call
    D n_embd                    V_ vocab
    H heads                     C kv_lora_rank (latent)
    R qk_rope_head_dim          N qk_nope_head_dim          V v_head_dim
    E routed experts            K experts used per token    F expert FFN width

    h = token_embd[tokens]                                   (T, D)
    per block:  h = h + mla(rmsnorm(h, attn_norm))           (T, D)
                h = h + ffn_or_moe(rmsnorm(h, ffn_norm))     (T, D)
    logits = output(rmsnorm(h, output_norm))                 (T, V_)

Generation: `Model.session()` keeps an MLA latent cache (C + R floats per token per layer);
`prefill(tokens)` runs a batch, `decode(token)` one more position in the absorbed form.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from r1cpu.kernels_numba.dispatch import embedding
from r1cpu.kernels_numba.threads import set_threads
from r1cpu.runtime import guards, mla, moe
from r1cpu.runtime.config import ConfigError, ModelConfig
from r1cpu.runtime.expert_cache import DEFAULT_POLICY, ExpertCache
from r1cpu.runtime.gguf_reader import GGUFFile
from r1cpu.runtime.kv_cache import MLACache
from r1cpu.runtime.memory import parse_size
from r1cpu.runtime.norm import rmsnorm
from r1cpu.runtime.prefetch import Prefetcher
from r1cpu.runtime.rope import Rope
from r1cpu.runtime.weights import MoEWeights, ModelWeights, linear, load_weights

DEFAULT_N_CTX = 4096


class Model:
    """A loaded model: config from GGUF metadata, weights as views of the one open file."""

    expert_cache: ExpertCache | None = None  # load(max_ram=...): routed experts read on demand
    prefetcher: Prefetcher | None = None

    def __init__(self, gguf: GGUFFile, config: ModelConfig, weights: ModelWeights):
        self.gguf, self.config, self.weights = gguf, config, weights
        self.rope = Rope(config)
        self.expert_stats = moe.ExpertStats(config.n_layer, config.n_expert)
        # Dense or MoE is decided once per block, here.
        self._ffn = [
            partial(moe.moe, w=lw.ffn, cfg=config, stats=self.expert_stats, layer=i)
            if isinstance(lw.ffn, MoEWeights)
            else partial(moe.dense_ffn, w=lw.ffn)
            for i, lw in enumerate(weights.layers)
        ]
        # Legacy files carry attn_kv_b: prefill expands it (naive form); MLA files stay absorbed.
        self.prefill_form = "naive" if weights.mla_layout == "legacy" else "absorbed"

    @property
    def default_n_ctx(self) -> int:
        return min(self.config.n_ctx_train, DEFAULT_N_CTX)

    def new_cache(self, n_ctx: int | None = None) -> MLACache:
        c = self.config
        return MLACache(c.n_layer, c.kv_lora_rank, c.qk_rope_head_dim, n_ctx or self.default_n_ctx)

    def forward(self, tokens, cache: MLACache, form: str | None = None, last_only: bool = False) -> np.ndarray:
        """Run tokens at positions cache.length.. ; returns logits (T, V_) or (1, V_) if last_only."""
        ids = self._check_tokens(tokens)
        T, cfg, w = len(ids), self.config, self.weights
        form = form or (self.prefill_form if T > 1 else "absorbed")
        cache.reserve(T)
        cos, sin = self.rope.tables(cache.length + np.arange(T))  # (T, R/2)
        h = embedding(w.token_embd, ids)  # (T, D)
        for i, lw in enumerate(w.layers):
            h = h + mla.attention(rmsnorm(h, lw.attn_norm, cfg.rms_eps), lw.attn, cfg, cos, sin, cache, i, form)
            if self.prefetcher is not None:  # start reading layer i+1's likely experts
                self.prefetcher.guess(i, h, early=True)
            h = h + self._ffn[i](rmsnorm(h, lw.ffn_norm, cfg.rms_eps))
            if self.prefetcher is not None:  # a better guess, with less time to read
                self.prefetcher.guess(i, h, early=False)
        cache.advance(T)
        if last_only:
            h = h[-1:]
        return guards.finite_logits(self, ids, cache, form, h, linear(rmsnorm(h, w.output_norm, cfg.rms_eps), w.output))

    def logits(self, tokens) -> np.ndarray:
        """float32 (T, V_) logits of a fresh context."""
        n = len(tokens)
        return self.forward(tokens, self.new_cache(max(n, 1)))

    def session(self, n_ctx: int | None = None) -> "Session":
        return Session(self, self.new_cache(n_ctx))

    def _check_tokens(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no tokens")
        if ids.min() < 0 or ids.max() >= self.config.n_vocab:
            raise ValueError(f"token id out of range 0..{self.config.n_vocab - 1}")
        return ids


class Session:
    """One growing context: prefill once, then decode a token at a time."""

    def __init__(self, model: Model, cache: MLACache):
        self.model, self.cache = model, cache

    @property
    def n_past(self) -> int:
        return self.cache.length

    def prefill(self, tokens, last_only: bool = False) -> np.ndarray:
        """logits (T, V_) for the tokens appended to the context; (V_,) of the last if last_only."""
        out = self.model.forward(tokens, self.cache, last_only=last_only)
        return out[0] if last_only else out

    def decode(self, token: int) -> np.ndarray:
        """logits (V_,) after appending one token (absorbed attention over the latent cache)."""
        return self.model.forward([token], self.cache, form="absorbed")[0]


def load(path, threads: int | None = None, max_ram: int | str | None = None, policy: str = DEFAULT_POLICY,
         prefetch: bool = True) -> Model:  # fmt: skip
    """Open a deepseek2 GGUF once; every weight is a view of its read-only map.

    threads: numba's worker count (None: the physical cores); BLAS is put on one thread so its
    spinning pool does not fight numba's (kernels_numba/threads.py).
    max_ram (bytes or "1.5G"): budget for the weights; routed experts then live in an expert cache
    (runtime/expert_cache.py, eviction `policy`) filled by reads, with `prefetch` of the next
    layer's likely experts. None: everything through the map, paged by the OS."""
    set_threads(threads)
    gguf = GGUFFile(path)
    try:
        config = ModelConfig.from_gguf(gguf.kv)
    except ConfigError as e:
        raise ConfigError(f"{Path(path)}: {e}") from None
    weights = load_weights(gguf, config)
    if max_ram is None:
        return Model(gguf, config, weights)
    cache = ExpertCache(gguf, config, weights, parse_size(max_ram), policy)
    model = Model(gguf, config, cache.attach(weights))
    model.expert_cache = cache
    model.prefetcher = Prefetcher(model.weights, config, cache) if prefetch and cache.layers else None
    return model
