"""`r1cpu perplexity`: llama-perplexity's protocol (tools/perplexity/perplexity.cpp) on a GGUF model.

The text is tokenized once, with BOS in front when the model adds one, and cut into len // ctx
chunks of ctx tokens (the tail is dropped; llama-perplexity wants at least two chunks). Each chunk
runs from an empty cache with its first token replaced by BOS (when the model adds one), and only
its second half is scored: the logits at positions ctx/2 .. ctx-2 predict the tokens at
ctx/2+1 .. ctx-1, so every chunk scores ctx - 1 - ctx/2 tokens, each with context >= ctx/2.

    PPL = exp(mean NLL)  +/-  PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1))
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from r1cpu.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class Chunks:
    """tokens int32[n_chunk, ctx]: each chunk as it is evaluated (BOS already in place)."""

    tokens: np.ndarray

    @property
    def ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def first(self) -> int:
        """Position of the first scored logit."""
        return self.ctx // 2

    @property
    def targets(self) -> np.ndarray:
        """int[n_chunk, ctx - 1 - first]: the tokens the scored logits predict."""
        return self.tokens[:, self.first + 1 :]


def make_chunks(model_path, text: str, ctx: int = 512, n_chunks: int | None = None) -> Chunks:
    """Tokenize `text` with the GGUF's own tokenizer and cut it as llama-perplexity does."""
    if ctx < 4:
        raise ValueError(f"--ctx must be at least 4, got {ctx}")
    tok = Tokenizer.from_gguf(model_path)
    ids = np.asarray(tok.encode(text, add_bos=tok.add_bos), dtype=np.int32)
    if len(ids) < 2 * ctx:
        raise ValueError(f"the text has {len(ids)} tokens; a context of {ctx} needs at least {2 * ctx}")
    chunks = ids[: len(ids) // ctx * ctx].reshape(-1, ctx)[:n_chunks].copy()
    if tok.add_bos:
        chunks[:, 0] = tok.bos_id
    return Chunks(chunks)


def read_text(path) -> str:
    return Path(path).read_text(encoding="utf-8")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32[..., V] logits -> float32 log-probabilities, computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z.astype(np.float32)


def scored_logprobs(model, chunk: np.ndarray, first: int) -> np.ndarray:
    """float32[ctx - 1 - first, V]: log-probabilities at the scored positions of one chunk."""
    return log_softmax(model.logits(chunk)[first:-1])


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity computes them (0 error for < 11 values)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    var = float(np.mean(v * v)) - mean * mean
    return mean, (float(np.sqrt(var / (v.size - 1))) if var > 0 and v.size > 10 else 0.0)


@dataclass(frozen=True)
class Perplexity:
    nll: np.ndarray  # float64[count]: -log p(token) of every scored token

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def error(self) -> float:
        var = float(np.mean(self.nll**2) - self.nll.mean() ** 2)
        return self.ppl * float(np.sqrt(var / (self.nll.size - 1))) if var > 0 else 0.0

    def __str__(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.error:.5f}"


def token_nll(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -logprobs[np.arange(len(targets)), targets].astype(np.float64)


@contextmanager
def chunk_bar(n: int, desc: str, progress):
    """progress: False (quiet), True (a bar of its own) or a caller's tqdm bar, which is left open."""
    if isinstance(progress, tqdm):
        yield progress
        return
    with tqdm(total=n, desc=desc, unit="chunk", disable=not progress) as bar:
        yield bar


def perplexity(model, chunks: Chunks, progress=False) -> Perplexity:
    """Score every chunk (see the module docstring)."""
    nll = []
    with chunk_bar(len(chunks.tokens), "perplexity", progress) as bar:
        for chunk, targets in zip(chunks.tokens, chunks.targets):
            nll.append(token_nll(scored_logprobs(model, chunk, chunks.first), targets))
            bar.update()
    return Perplexity(np.concatenate(nll))
