"""`r1cpu compare`: convert one checkpoint to several types and measure each against its F32 file.

For every type: file size, bits per weight (tensor data / parameters), perplexity, mean KL
divergence, "same top p" and RMS Δp against the F32 model (runtime/perplexity.py and kld.py; the F32
log-probs are computed once), and decode speed (tg: tokens/s from the median single-token decode
step after a short prefill, the first step excluded as warm-up). The result is a Markdown table and, when
matplotlib is installed (`pip install 'r1cpu[plot]'`), a PNG of KLD against file size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from r1cpu.runtime.convert import convert
from r1cpu.runtime.kld import Base, KLDResult, compute_base, concat, kl_divergence, token_stats
from r1cpu.runtime.model import load
from r1cpu.runtime.perplexity import Perplexity, make_chunks
from r1cpu.runtime.recipes import recipe

TG_PROMPT = 16  # tokens prefilled before the timed decode steps


@dataclass(frozen=True)
class Row:
    type: str
    size: int  # file bytes
    bpw: float
    ppl: Perplexity
    kld: KLDResult
    tg: float  # decode tokens/s


def decode_speed(model, tokens: np.ndarray, n: int) -> float:
    """Tokens/s of decode: 1 / the median time of n single-token steps (teacher-forced from
    `tokens`) after a TG_PROMPT-token prefill. The median resists bursts of other load on the cores."""
    if len(tokens) < TG_PROMPT + n + 1:
        raise ValueError(f"--tg-tokens {n} needs a context of at least {TG_PROMPT + n + 1}")
    session = model.session(n_ctx=TG_PROMPT + n + 1)
    session.prefill(tokens[:TG_PROMPT], last_only=True)
    session.decode(int(tokens[TG_PROMPT]))  # warm-up: the first call may compile
    steps = []
    for tok in tokens[TG_PROMPT + 1 : TG_PROMPT + 1 + n]:
        t0 = time.perf_counter()
        session.decode(int(tok))
        steps.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(steps))


def _self_stats(base: Base) -> KLDResult:
    """The F32 row: the base against itself (KLD 0, same top 100 %), without running it again."""
    parts = [token_stats(lp, lp, t) for lp, t in zip(base.logprobs, base.chunks.targets)]
    return KLDResult(concat(parts))


def compare(src_dir, types: list[str], text: str, out_dir, ctx: int = 512, n_chunks: int | None = None,
            tg_tokens: int = 32, threads: int | None = None, progress: bool = True) -> list[Row]:  # fmt: skip
    """The F32 row first, then one row per type; GGUF files are written to out_dir."""
    for t in types:
        recipe(t)  # an unknown type fails before any work
    src, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=1, desc="compare", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("convert f32")
        f32 = convert(src, out_dir / f"{src.name}.f32.gguf", "f32", force=True, threads=threads)
        chunks = make_chunks(f32.path, text, ctx, n_chunks)
        bar.total = (len(types) + 1) * (len(chunks.tokens) + 2)  # per type: convert, chunks, tg
        bar.update()
        model = load(f32.path, threads=threads)
        bar.set_postfix_str("f32 log-probs")
        base = compute_base(model, chunks, bar)
        rows = [_row("f32", f32, _self_stats(base), decode_speed(model, chunks.tokens[0], tg_tokens))]
        bar.update()
        for t in types:
            bar.set_postfix_str(f"convert {t}")
            s = convert(src, out_dir / f"{src.name}.{t}.gguf", t, force=True, threads=threads)
            bar.update()
            bar.set_postfix_str(f"{t} kld")
            model = load(s.path, threads=threads)
            rows.append(_row(t, s, kl_divergence(model, base, bar), decode_speed(model, chunks.tokens[0], tg_tokens)))
            bar.update()
    return rows


def _row(name: str, summary, kld: KLDResult, tg: float) -> Row:
    return Row(name, summary.n_bytes, summary.bits_per_weight, Perplexity(kld.t.nll), kld, tg)


def markdown(rows: list[Row]) -> str:
    lines = ["| type | size (MiB) | bits/weight | PPL | mean KLD | same top p (%) | RMS Δp (%) | tg (tok/s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        (k, ke), (top, te), (dp, de) = r.kld.kld, r.kld.same_top, r.kld.rms_dp
        lines.append(f"| {r.type} | {r.size / 2**20:.2f} | {r.bpw:.2f} | {r.ppl.ppl:.3f} ± {r.ppl.error:.3f} | "
                     f"{k:.5f} ± {ke:.5f} | {100 * top:.2f} ± {100 * te:.2f} | {100 * dp:.3f} ± {100 * de:.3f} | "
                     f"{r.tg:.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[Row], path, title: str) -> bool:
    """KLD (log scale) against file size, one labelled point per quantized type; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    quant = [r for r in rows if r.kld.kld[0] > 0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    x = [r.size / 2**20 for r in quant]
    y, err = [r.kld.kld[0] for r in quant], [r.kld.kld[1] for r in quant]
    ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
    for r, xi, yi in zip(quant, x, y):
        ax.annotate(r.type, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set(xlabel="file size (MiB)", ylabel="mean KL divergence vs F32", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
