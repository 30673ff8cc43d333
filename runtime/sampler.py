"""Token sampling from float32 logits, built from small pure functions.

Order as in transformers' logits processors: repetition penalty, temperature, top-k, top-p, min-p,
then one draw from the seeded generator. Temperature 0 is greedy (argmax after the penalty).
Filters return (ids, logits) of the candidates they keep, so later steps work on fewer entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

# DeepSeek's usage notes for R1: temperature 0.5-0.7 (0.6), top-p 0.95.
R1_TEMPERATURE, R1_TOP_P = 0.6, 0.95
PENALTY_WINDOW = 64  # recent tokens the repetition penalty looks at (llama.cpp's repeat_last_n)
_TOP_P_FIRST_CUT = 1024  # candidates sorted first; the full sort runs only if they hold < top_p mass


def apply_repetition_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style: the logit of each recently seen token is divided by penalty if positive, else multiplied."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(), dtype=np.float64)
    return e / e.sum()


def top_k(ids: np.ndarray, logits: np.ndarray, k: int):
    """The k highest logits (all if k <= 0 or k >= n), unsorted."""
    if k <= 0 or k >= len(ids):
        return ids, logits
    keep = np.argpartition(logits, -k)[-k:]
    return ids[keep], logits[keep]


def top_p(ids: np.ndarray, logits: np.ndarray, p: float):
    """The smallest highest-probability set whose mass reaches p (at least one token)."""
    if p >= 1.0:
        return ids, logits
    probs = softmax(logits)
    cut = min(_TOP_P_FIRST_CUT, len(ids))
    head = np.argpartition(probs, -cut)[-cut:] if cut < len(ids) else np.arange(len(ids))
    if probs[head].sum() < p:  # rare (a very flat distribution): sort everything
        head = np.arange(len(ids))
    order = head[np.argsort(-probs[head], kind="stable")]
    n_keep = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
    keep = order[: min(n_keep, len(order))]
    return ids[keep], logits[keep]


def min_p(ids: np.ndarray, logits: np.ndarray, p: float):
    """Tokens whose probability is at least p times the most likely token's."""
    if p <= 0.0:
        return ids, logits
    keep = logits >= logits.max() + np.log(p)
    return ids[keep], logits[keep]


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float = R1_TEMPERATURE
    top_p: float = R1_TOP_P
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (0 < self.top_p <= 1, "top-p must be in (0, 1]"),
                  (self.top_k >= 0, "top-k must be >= 0"), (0 <= self.min_p < 1, "min-p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition penalty must be > 0")]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


Sampler = Callable[[np.ndarray, Sequence[int]], int]


def make_sampler(settings: SamplerSettings | None = None, **overrides) -> Sampler:
    """A callable (logits (V_,), context token ids) -> next token id; seeded runs repeat exactly."""
    s = SamplerSettings(**overrides) if settings is None else settings
    rng = np.random.default_rng(s.seed)

    def sample(logits: np.ndarray, context: Sequence[int] = ()) -> int:
        logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), context[-PENALTY_WINDOW:],
                                          s.repetition_penalty)  # fmt: skip
        if s.temperature == 0.0:
            return int(np.argmax(logits))
        ids = np.arange(len(logits))
        ids, cand = top_k(ids, logits / np.float32(s.temperature), s.top_k)
        ids, cand = top_p(ids, cand, s.top_p)
        ids, cand = min_p(ids, cand, s.min_p)
        return int(ids[rng.choice(len(ids), p=softmax(cand))])

    return sample
