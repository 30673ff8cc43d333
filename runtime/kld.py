"""`r1cpu kld`: a model's token distributions against a base model's, as `llama-perplexity
--kl-divergence` reports them: PPL of both, mean KL divergence with its error and percentiles, the
change Δp of the probability of the actual next token (mean, percentiles, RMS) and "same top p",
the fraction of positions where both models rank the same token first.

Chunks and scored positions are those of runtime/perplexity.py. The base log-probabilities can be
saved once (`save_base`: tokens int32[n_chunk, ctx] and log-probs float32[n_chunk, ctx-1-ctx/2, V]
in an .npz, 4 bytes per vocabulary entry per scored token) and reused for many models. Unlike
llama.cpp, which stores them as 16-bit codes and drops base probabilities below e^-16, the sums
here are exact float64 over the whole vocabulary.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields

import numpy as np

from r1cpu.runtime.perplexity import Chunks, chunk_bar, make_chunks, mean_and_error, scored_logprobs, token_nll

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)


@dataclass(frozen=True)
class Base:
    chunks: Chunks
    logprobs: np.ndarray  # float32[n_chunk, n_scored, V]


def compute_base(model, chunks: Chunks, progress=False) -> Base:
    """progress: False, True (a bar of its own) or a tqdm bar to advance once per chunk."""
    lp = []
    with chunk_bar(len(chunks.tokens), "base", progress) as bar:
        for chunk in chunks.tokens:
            lp.append(scored_logprobs(model, chunk, chunks.first))
            bar.update()
    return Base(chunks, np.stack(lp))


def save_base(path, base: Base) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, tokens=base.chunks.tokens, logprobs=base.logprobs)


def load_base(path) -> Base:
    try:
        with np.load(path) as z:
            tokens, logprobs = z["tokens"], z["logprobs"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a base log-prob file written by --save-base ({e})") from None
    chunks = Chunks(tokens)
    if logprobs.shape[:2] != chunks.targets.shape:
        raise ValueError(f"{path}: log-probs {logprobs.shape} do not match tokens {tokens.shape}")
    return Base(chunks, logprobs)


def is_base_file(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # a zip (npz); a GGUF starts with "GGUF"


@dataclass(frozen=True)
class TokenStats:
    """Per scored token, concatenated over chunks."""

    kld: np.ndarray  # sum_v p_base (log p_base - log p)
    p_diff: np.ndarray  # p(next token) - p_base(next token)
    same_top: np.ndarray  # bool: the same most likely token
    nll: np.ndarray
    nll_base: np.ndarray


def token_stats(base_lp: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> TokenStats:
    b, q = base_lp.astype(np.float64), lp.astype(np.float64)
    nll, nll_base = token_nll(lp, targets), token_nll(base_lp, targets)
    kld = np.sum(np.exp(b) * (b - q), axis=-1)
    same = base_lp.argmax(axis=-1) == lp.argmax(axis=-1)
    return TokenStats(kld, np.exp(-nll) - np.exp(-nll_base), same, nll, nll_base)


def kl_divergence(model, base: Base, progress=False) -> "KLDResult":
    """progress: False, True (a bar of its own) or a tqdm bar to advance once per chunk."""
    if model.config.n_vocab != base.logprobs.shape[-1]:
        raise ValueError(f"vocabularies differ: {model.config.n_vocab} tokens vs the base's {base.logprobs.shape[-1]}")
    chunks, parts = base.chunks, []
    with chunk_bar(len(chunks.tokens), "kld", progress) as bar:
        for lp, chunk, targets in zip(base.logprobs, chunks.tokens, chunks.targets):
            parts.append(token_stats(lp, scored_logprobs(model, chunk, chunks.first), targets))
            bar.update()
    return KLDResult(concat(parts))


def concat(parts: list[TokenStats]) -> TokenStats:
    return TokenStats(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(TokenStats)))


@dataclass(frozen=True)
class KLDResult:
    t: TokenStats

    @property
    def kld(self) -> tuple[float, float]:
        return mean_and_error(self.t.kld)

    @property
    def same_top(self) -> tuple[float, float]:
        p, n = float(self.t.same_top.mean()), self.t.same_top.size
        return p, float(np.sqrt(p * (1 - p) / (n - 1)))

    @property
    def rms_dp(self) -> tuple[float, float]:
        mse, mse_err = mean_and_error(self.t.p_diff**2)
        rms = float(np.sqrt(mse))
        return rms, (0.5 / rms * mse_err if rms > 0 else 0.0)

    def ppl_lines(self) -> list[str]:
        (lq, eq), (lb, eb) = mean_and_error(self.t.nll), mean_and_error(self.t.nll_base)
        n = self.t.nll.size
        cov = float(np.mean(self.t.nll * self.t.nll_base) - lq * lb) / (n - 1) if n >= 10 else 0.0
        ratio_err = float(np.sqrt(max(eq * eq + eb * eb - 2 * cov, 0.0)))
        pq, pb = np.exp(lq), np.exp(lb)
        diff_err = float(np.sqrt(max((pq * eq) ** 2 + (pb * eb) ** 2 - 2 * pq * pb * cov, 0.0)))
        return [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {pq:10.6f} ± {pq * eq:10.6f}",
            f"Mean PPL(base)                : {pb:10.6f} ± {pb * eb:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * cov / (eq * eb) if eq * eb else 0.0:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {lq - lb:10.6f} ± {ratio_err:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {np.exp(lq - lb):10.6f} ± {np.exp(lq - lb) * ratio_err:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {pq - pb:10.6f} ± {diff_err:10.6f}",
        ]

    def kld_lines(self) -> list[str]:
        k = self.t.kld
        mean, err = self.kld
        lines = ["====== KL divergence statistics ======", f"Mean    KLD: {mean:10.6f} ± {err:10.6f}",
                 f"Maximum KLD: {k.max():10.6f}"]  # fmt: skip
        lines += [f"{f'{q:.1f}%':<8}KLD: {np.percentile(k, q):10.6f}" for q in PERCENTILES[:4]]
        lines.append(f"Median  KLD: {np.median(k):10.6f}")
        lines += [f"{f'{q:.1f}%':>5}   KLD: {np.percentile(k, q):10.6f}" for q in PERCENTILES[4:]]
        return lines + [f"Minimum KLD: {k.min():10.6f}"]

    def dp_lines(self) -> list[str]:
        d = 100 * self.t.p_diff
        mean, err = mean_and_error(d)
        lines = ["====== Token probability statistics ======", f"Mean    Δp: {mean:6.3f} ± {err:5.3f} %",
                 f"Maximum Δp: {d.max():6.3f}%"]  # fmt: skip
        for q in DP_PERCENTILES:
            if q == 25.0:
                lines.append(f"Median  Δp: {np.median(d):6.3f}%")
            lines.append(f"{f'{q:.1f}%':>5}   Δp: {np.percentile(d, q):6.3f}%")
        (rms, rms_err), (top, top_err) = self.rms_dp, self.same_top
        return lines + [f"Minimum Δp: {d.min():6.3f}%", f"RMS Δp    : {100 * rms:6.3f} ± {100 * rms_err:5.3f} %",
                        f"Same top p: {100 * top:6.3f} ± {100 * top_err:5.3f} %"]  # fmt: skip

    def __str__(self) -> str:
        return "\n".join(self.ppl_lines() + [""] + self.kld_lines() + [""] + self.dp_lines())


def prepare_base(base_path, text: str | None, ctx: int | None, n_chunks: int | None, progress: bool) -> Base:
    """The base log-probs: read from a --save-base file (whose tokens `text`, if given, must
    reproduce), or computed by running the base GGUF on `text`."""
    from r1cpu.runtime.model import load

    if is_base_file(base_path):
        base = load_base(base_path)
        if ctx not in (None, base.chunks.ctx):
            raise ValueError(f"{base_path} was computed with --ctx {base.chunks.ctx}, not {ctx}")
        return base
    if text is None:
        raise ValueError("--file is needed when BASE is a model rather than a --save-base file")
    chunks = make_chunks(base_path, text, ctx or 512, n_chunks)
    return compute_base(load(base_path), chunks, progress)


def check_same_text(base: Base, model_path, text: str) -> None:
    """Raise unless `text`, tokenized by the model at model_path, gives the base's chunks."""
    chunks = make_chunks(model_path, text, base.chunks.ctx, len(base.chunks.tokens))
    if not np.array_equal(chunks.tokens, base.chunks.tokens):
        raise ValueError(f"{model_path}: the text tokenizes differently from the base's chunks")
