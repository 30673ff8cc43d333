"""Numerical guards at run time: non-finite logits are an error naming the stage where the first
NaN/Inf appeared, instead of being sampled as garbage.

The check on every forward is a float64 sum of the final hidden state and one of the logits: a sum
of finite float32 values cannot overflow float64 (|x| < 3.5e38, far fewer than 1e270 terms), so it is
finite exactly when every value is. The hidden state is checked too because a NaN, once in the
residual stream, stays there, but a linear on 8-bit-quantized activations can turn it into finite
garbage before the logits. Only when a check fails, the call is replayed block by block on a copy of
the cache as it was before the call, to find where the values first stopped being finite.
"""

from __future__ import annotations

import math

import numpy as np

from r1cpu.kernels_numba.dispatch import embedding
from r1cpu.runtime import mla
from r1cpu.runtime.kv_cache import MLACache
from r1cpu.runtime.norm import rmsnorm


class NumericalError(ValueError):
    """Non-finite values in a forward pass; the message names the file, positions and stage."""


def all_finite(x: np.ndarray) -> bool:
    return math.isfinite(float(np.sum(x, dtype=np.float64)))


def finite_logits(model, ids: np.ndarray, cache: MLACache, form: str, h: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Return logits unchanged when they and the final hidden state h are finite; otherwise raise
    NumericalError (one line). Called after the forward pass has advanced `cache` by len(ids)."""
    if all_finite(h) and all_finite(logits):
        return logits
    first = cache.length - len(ids)
    bad = logits if not all_finite(logits) else h
    kind = "NaN" if np.isnan(bad).any() else "Inf"
    where = "logits" if bad is logits else "hidden states"
    stage = first_bad_stage(model, ids, _cache_before(model, cache, first), form)
    raise NumericalError(
        f"{model.gguf.path}: {where} contain {kind} at positions {first}..{cache.length - 1}; "
        f"the first non-finite values appear in {stage}"
    )


def _cache_before(model, cache: MLACache, first: int) -> MLACache:
    """A copy of the cache holding only the positions before the failed call."""
    replay = model.new_cache(cache.n_ctx)
    replay.reserve(first)
    for mine, theirs in zip(replay.kv, cache.kv):
        mine[:first] = theirs[:first]
    replay.length = first
    return replay


def first_bad_stage(model, ids: np.ndarray, cache: MLACache, form: str) -> str:
    for stage, h in replay(model, ids, cache, form):
        if not all_finite(h):
            return stage
    return "the output head (output_norm / output.weight)"


def replay(model, ids: np.ndarray, cache: MLACache, form: str):
    """Yield (stage, hidden state (T, D)) after each stage of Model.forward: the same calls in the
    same order. tests/test_hardening.py checks that the replay ends where forward does."""
    cfg, w = model.config, model.weights
    cache.reserve(len(ids))
    cos, sin = model.rope.tables(cache.length + np.arange(len(ids)))
    h = embedding(w.token_embd, ids)
    yield "token_embd (the embedding rows of these tokens)", h
    for i, lw in enumerate(w.layers):
        h = h + mla.attention(rmsnorm(h, lw.attn_norm, cfg.rms_eps), lw.attn, cfg, cos, sin, cache, i, form)
        yield f"layer {i} attention (blk.{i}.attn_*)", h
        h = h + model._ffn[i](rmsnorm(h, lw.ffn_norm, cfg.rms_eps))
        yield f"layer {i} feed-forward (blk.{i}.ffn_*)", h
