"""Text generation over a Session: chunked prefill, then sample-decode one token at a time.

`generate` yields Pieces as tokens arrive: the text ready to print (never half a UTF-8 character,
never part of a possible stop string), the token id, and the live Stats. The last Piece has
token None, carries whatever text was held back, and its stats say why generation stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from r1cpu.runtime.sampler import Sampler
from r1cpu.runtime.tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK = 256  # tokens per prefill call: bounds the naive-attention temporaries of long prompts


class ContextFullError(ValueError):
    pass


@dataclass
class Stats:
    n_prompt: int = 0
    prompt_s: float = 0.0
    n_gen: int = 0
    gen_s: float = 0.0
    stop_reason: str | None = None  # "eos" | "stop" | "length" | "context"; None while running

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.n_gen / self.gen_s if self.gen_s > 0 else 0.0


@dataclass
class Piece:
    text: str
    token: int | None  # None on the final piece
    stats: Stats


class StopMatcher:
    """Finds stop strings across piece boundaries; holds back a tail that may still become one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit); text after a hit is dropped."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def check_fits(session, n_new: int) -> None:
    n_ctx, used = session.cache.n_ctx, session.n_past
    if used + n_new > n_ctx:
        raise ContextFullError(f"prompt of {n_new} tokens does not fit: {used} of {n_ctx} context tokens in use "
                               f"(start a new conversation, drop old turns, or use a larger context)")  # fmt: skip


def prefill(session, tokens: Sequence[int], chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """Logits (V_,) after the last token, prefilling in chunks of `chunk` tokens."""
    if len(tokens) == 0:
        raise ValueError("nothing to prefill")
    check_fits(session, len(tokens))
    for start in range(0, len(tokens), chunk):
        logits = session.prefill(tokens[start : start + chunk], last_only=True)
    return logits


def _timed(stats: Stats, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    stats.gen_s += time.perf_counter() - t0
    return out


def generate(session, tokenizer: Tokenizer, prompt: Sequence[int], sampler: Sampler, max_tokens: int,
             stop: Iterable[str] = (), context: Sequence[int] | None = None,
             eos_ids: Iterable[int] | None = None) -> Iterator[Piece]:  # fmt: skip
    """Prefill `prompt` after what the session holds, then yield Pieces until EOS, a stop string,
    max_tokens or a full context. `context` (default: prompt) seeds the repetition penalty."""
    stats = Stats(n_prompt=len(prompt))
    eos = set(eos_ids) if eos_ids is not None else {tokenizer.eos_id}
    history = list(prompt if context is None else context)
    decoder, stops = StreamDecoder(tokenizer, skip_control=True), StopMatcher(stop)
    t0 = time.perf_counter()
    logits = prefill(session, prompt)
    stats.prompt_s = time.perf_counter() - t0
    while stats.stop_reason is None:
        if stats.n_gen >= max_tokens:
            stats.stop_reason = "length"
            break
        token = _timed(stats, sampler, logits, history)
        if token in eos:
            stats.stop_reason = "eos"
            break
        history.append(token)
        stats.n_gen += 1
        text, hit = stops.feed(decoder.push(token))
        if hit:
            stats.stop_reason = "stop"
        elif session.n_past >= session.cache.n_ctx:
            stats.stop_reason = "context"
        yield Piece(text, token, stats)
        # The last sampled token is never decoded: nothing would read its logits.
        if stats.stop_reason is None and stats.n_gen < max_tokens:
            logits = _timed(stats, session.decode, token)
    tail = "" if stats.stop_reason == "stop" else stops.feed(decoder.flush())[0] + stops.flush()
    yield Piece(tail, None, stats)
