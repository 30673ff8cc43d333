"""`r1cpu generate` and `r1cpu chat`: click commands over generate.py and chat.py (registered in cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from r1cpu.runtime.cli_errors import one_line_errors
from r1cpu.runtime.sampler import R1_TEMPERATURE, R1_TOP_P, SamplerSettings

# The embedded default model of `r1cpu chat` and `make demo`: the tiny R1 trained by
# tools/train_tiny_r1.py, converted to Q8_0 and installed as package data (about 2 MB).
DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "tiny-r1.q8_0.gguf"


def _sampling_options(fn):
    options = [
        click.option("--temp", "temperature", type=float, default=R1_TEMPERATURE, show_default=True,
                     help="temperature; 0 = greedy"),
        click.option("--top-p", type=float, default=R1_TOP_P, show_default=True, help="nucleus mass kept"),
        click.option("--top-k", type=int, default=0, show_default=True, help="keep the k best tokens; 0 = off"),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="drop tokens below min-p x best"),
        click.option("--repeat-penalty", "repetition_penalty", type=float, default=1.0, show_default=True,
                     help="penalty on the last 64 tokens; 1 = off"),
        click.option("--seed", type=int, default=None, help="random seed (fixed seed: same output)"),
        click.option("--ctx", "n_ctx", type=int, default=None, help="context size (default: min(trained, 4096))"),
        click.option("--threads", type=int, default=None, help="compute threads (default: all cores)"),
        click.option("--max-ram", default=None, metavar="SIZE",
                     help="keep the weights within SIZE (e.g. 1.5G): routed experts are read on demand into a cache"),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _open(model_path: str, threads: int | None, max_ram: str | None = None):
    import r1cpu
    from r1cpu.runtime.chat_template import ChatTemplate
    from r1cpu.runtime.tokenizer import Tokenizer

    model = r1cpu.load(model_path, threads, max_ram=max_ram)
    return model, Tokenizer(model.gguf.kv), ChatTemplate.from_kv(model.gguf.kv)


def _settings(kw: dict) -> SamplerSettings:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    return SamplerSettings(**{k: kw.pop(k) for k in keys})


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("-p", "--prompt", required=True, help="prompt text; '-' reads it from stdin")
@click.option("--chat", "as_chat", is_flag=True, help="send the prompt as one user turn through the chat template")
@click.option("--system", default=None, help="system prompt (with --chat)")
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="most tokens to generate")
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of streaming text")
@_sampling_options
@one_line_errors
def generate(model, prompt, as_chat, system, max_tokens, stop, as_json, n_ctx, threads, max_ram, **sampling):
    """Generate text for one prompt: streams to stdout, speed on stderr."""
    from r1cpu.runtime.generate import generate as run
    from r1cpu.runtime.sampler import make_sampler

    settings = _settings(sampling)
    model, tokenizer, template = _open(model, threads, max_ram)
    text = sys.stdin.read() if prompt == "-" else prompt
    if as_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = tokenizer.encode(template.render(messages, add_generation_prompt=True))
    else:
        ids = tokenizer.encode(text, add_bos=tokenizer.add_bos)
    out, tokens = [], []
    for piece in run(model.session(n_ctx), tokenizer, ids, make_sampler(settings), max_tokens, stop=stop):
        out.append(piece.text)
        tokens += [] if piece.token is None else [piece.token]
        if not as_json:
            click.echo(piece.text, nl=False)
    s = piece.stats
    if as_json:
        click.echo(json.dumps({"text": "".join(out), "tokens": tokens, "stop_reason": s.stop_reason,
                               "prompt_tokens": s.n_prompt, "prompt_tok_per_s": round(s.prompt_tps, 2),
                               "gen_tokens": s.n_gen, "gen_tok_per_s": round(s.gen_tps, 2),
                               **_expert_json(model)}, ensure_ascii=False))  # fmt: skip
    else:
        click.echo()
    click.echo(f"prompt: {s.n_prompt} tokens, {s.prompt_tps:.1f} tok/s | generated: {s.n_gen} tokens, "
               f"{s.gen_tps:.1f} tok/s | stop: {s.stop_reason}", err=True)  # fmt: skip
    if model.expert_cache is not None:
        click.echo(model.expert_cache.summary(tokens=s.n_prompt + s.n_gen), err=True)


def _expert_json(model) -> dict:
    """--max-ram counters (runtime/expert_cache.COUNTERS) and the process's peak RSS, when budgeted."""
    from r1cpu.runtime.memory import process_memory

    if model.expert_cache is None:
        return {}
    return {"expert_cache": model.expert_cache.totals(), "peak_rss": process_memory()["peak_rss"]}


@click.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, exists=True))
@click.option("-n", "--max-tokens", type=int, default=1024, show_default=True, help="most tokens per answer")
@click.option("--system", default=None, help="system prompt")
@click.option("--drop-oldest", is_flag=True, help="drop the oldest turns when the context is full")
@click.option("--hide-think", is_flag=True, help="fold the reasoning (/think show|hide switches)")
@click.option("--history", "history_file", type=click.Path(dir_okay=False), default=None,
              help="keep the input history in this file")  # fmt: skip
@_sampling_options
@one_line_errors
def chat(model, max_tokens, system, drop_oldest, hide_think, history_file, n_ctx, threads, max_ram, **sampling):
    """Chat in the terminal (MODEL: a GGUF file; default: the embedded tiny R1).

    Without a terminal, each line of stdin is one message (a trailing backslash continues it)."""
    from r1cpu.runtime.chat import run_chat
    from r1cpu.runtime.chat_session import Conversation
    from r1cpu.runtime.sampler import make_sampler

    settings = _settings(sampling)
    model, tokenizer, template = _open(model or DEFAULT_MODEL, threads, max_ram)
    conv = Conversation(model, tokenizer, template, n_ctx, drop_oldest=drop_oldest)
    if system:
        conv.set_system(system)
    run_chat(conv, make_sampler(settings), max_tokens, show_think=not hide_think, history_file=history_file)
