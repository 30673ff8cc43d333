"""The `r1cpu` command line: a thin click layer over the library."""

from __future__ import annotations

import signal
import sys

import click

from r1cpu.runtime.recipes import RECIPES


class _Fail(click.ClickException):
    """One-line error on stderr, exit code 1, no traceback."""


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as e:  # our errors subclass ValueError and name the file/tensor
        raise _Fail(str(e)) from None
    except KeyboardInterrupt as e:
        click.echo("interrupted", err=True)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))  # 130 for Ctrl-C, 143 for SIGTERM


@click.group()
@click.version_option(package_name="r1cpu")
def main():
    """r1cpu: run DeepSeek-R1/V3-architecture GGUF models on the CPU."""


@main.command()
@click.argument("src_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="output .gguf file")
@click.option("--type", "out_type", default="f16", show_default=True, type=click.Choice(sorted(RECIPES)),
              help="storage type of the weight matrices")  # fmt: skip
@click.option("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="type of the tensors whose name matches the regex (repeatable, first match wins)")  # fmt: skip
def convert(src_dir, out, out_type, threads, force, tensor_types):
    """Convert a Hugging Face DeepSeek checkpoint folder to GGUF (llama.cpp's deepseek2 layout)."""
    from r1cpu.runtime.convert import convert as run_convert

    summary = _run(run_convert, src_dir, out, out_type, force=force, threads=threads, progress=True,
                   tensor_types=tensor_types)  # fmt: skip
    click.echo(str(summary))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--tensors", is_flag=True, help="list every tensor")
def info(model, tensors):
    """Print a GGUF file's architecture, hyperparameters and tensor summary."""
    from r1cpu.runtime.gguf_info import describe

    click.echo(_run(describe, model, tensors))


from r1cpu.runtime.chat_cli import chat, generate  # noqa: E402  (their own module: generate/chat loops)
from r1cpu.runtime.accuracy_cli import compare, kld, perplexity  # noqa: E402  (accuracy tools)
from r1cpu.runtime.eval_tasks import eval_tasks  # noqa: E402  (held-out reasoning-task accuracy)
from r1cpu.runtime.plan import plan_command  # noqa: E402  (memory and speed calculator)
from r1cpu.runtime.bench import bench_command  # noqa: E402  (speed against llama.cpp and the roofline)

for _command in (generate, chat, perplexity, kld, compare, eval_tasks, plan_command, bench_command):
    main.add_command(_command)
