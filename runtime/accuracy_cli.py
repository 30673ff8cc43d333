"""`r1cpu perplexity`, `r1cpu kld` and `r1cpu compare`: click commands over perplexity.py, kld.py and
compare.py (registered in cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from r1cpu.runtime.cli_errors import one_line_errors


def _file_option(required: bool):
    return click.option("--file", "text_file", required=required, type=click.Path(exists=True, dir_okay=False),
                        help="evaluation text (UTF-8)")  # fmt: skip


_CHUNKS = click.option("--chunks", "n_chunks", type=click.IntRange(min=1), default=None, help="score at most N chunks")
_THREADS = click.option("--threads", type=int, default=None, help="compute threads (default: all cores)")


def _text(path) -> str | None:
    from r1cpu.runtime.perplexity import read_text

    return None if path is None else read_text(path)


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@_file_option(required=True)
@click.option("--ctx", type=click.IntRange(min=4), default=512, show_default=True, help="tokens per chunk")
@_CHUNKS
@_THREADS
@one_line_errors
def perplexity(model, text_file, ctx, n_chunks, threads):
    """Perplexity of MODEL on a text, by llama-perplexity's protocol (second half of each chunk scored)."""
    from r1cpu.runtime.model import load
    from r1cpu.runtime.perplexity import make_chunks
    from r1cpu.runtime.perplexity import perplexity as run

    chunks = make_chunks(model, _text(text_file), ctx, n_chunks)
    click.echo(f"{len(chunks.tokens)} chunks of {ctx} tokens, {chunks.targets.size} scored", err=True)
    click.echo(str(run(load(model, threads=threads), chunks, progress=True)))


@click.command()
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@_file_option(required=False)
@click.option("--ctx", type=click.IntRange(min=4), default=None,
              help="tokens per chunk [default: 512, or the saved base's]")  # fmt: skip
@_CHUNKS
@click.option("--save-base", type=click.Path(dir_okay=False), default=None, help="save BASE's log-probs here for reuse")
@_THREADS
@one_line_errors
def kld(base, model, text_file, ctx, n_chunks, save_base, threads):
    """KL divergence of MODEL from BASE (a GGUF, or a file written by --save-base), as llama-perplexity
    --kl-divergence reports it."""
    from r1cpu.runtime import kld as k
    from r1cpu.runtime.model import load

    text = _text(text_file)
    ref = k.prepare_base(base, text, ctx, n_chunks, progress=True)
    if k.is_base_file(base) and text is not None:
        k.check_same_text(ref, model, text)
    if save_base:
        k.save_base(save_base, ref)
    click.echo(str(k.kl_divergence(load(model, threads=threads), ref, progress=True)))


@click.command()
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--types", default="q8_0,q6_k,q5_k_m,q4_k_m,q4_0,q3_k_m,q2_k", show_default=True,
              help="comma-separated recipes (as r1cpu convert --type)")  # fmt: skip
@_file_option(required=True)
@click.option("--ctx", type=click.IntRange(min=4), default=512, show_default=True, help="tokens per chunk")
@_CHUNKS
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default=None,
              help="where the GGUF files, compare.md and compare.png go [default: SRC_DIR-compare]")  # fmt: skip
@click.option("--tg-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="decode steps timed")
@_THREADS
@one_line_errors
def compare(src_dir, types, text_file, ctx, n_chunks, out_dir, tg_tokens, threads):
    """Convert SRC_DIR to each type and measure size, bits/weight, PPL, KLD, same top p and tg against F32."""
    from r1cpu.runtime import compare as c

    src = Path(src_dir)
    out = Path(out_dir) if out_dir else src.with_name(src.name + "-compare")
    names = [t.strip() for t in types.split(",") if t.strip()]
    rows = c.compare(src, names, _text(text_file), out, ctx, n_chunks, tg_tokens, threads)
    table = c.markdown(rows)
    (out / "compare.md").write_text(table + "\n", encoding="utf-8")
    click.echo(table)
    if c.plot(rows, out / "compare.png", f"{src.name}: KLD vs size"):
        click.echo(f"wrote {out / 'compare.md'} and {out / 'compare.png'}", err=True)
    else:
        click.echo(f"wrote {out / 'compare.md'}; no PNG without matplotlib (pip install 'r1cpu[plot]')", err=True)
