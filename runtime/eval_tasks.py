"""`r1cpu eval-tasks`: accuracy on the held-out reasoning tasks of runtime/tasks.py, per task kind.

Each question goes through the GGUF's own chat template and tokenizer, is answered greedily in a
fresh session, and counts as right when the text after `</think>` equals the checked answer. It is a
quality measure beside perplexity and KL divergence: a quantization that breaks a step of the worked
arithmetic shows up here even when the logits look close.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import click

from r1cpu.runtime import tasks
from r1cpu.runtime.cli_errors import one_line_errors
from r1cpu.runtime.chat_template import ChatTemplate
from r1cpu.runtime.generate import generate
from r1cpu.runtime.sampler import make_sampler
from r1cpu.runtime.tokenizer import Tokenizer

SLACK_TOKENS = 64  # generation budget beyond the reference response's length


@dataclass
class Report:
    model: str
    right: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    wrong: list[dict] = field(default_factory=list)  # question, expected, the model's answer
    tokens: int = 0
    seconds: float = 0.0

    def accuracy(self) -> dict[str, float]:
        acc = {k: self.right[k] / self.total[k] for k in self.total}
        acc["all"] = sum(self.right.values()) / max(1, sum(self.total.values()))
        return acc

    def as_dict(self) -> dict:
        return {"model": self.model, "accuracy": self.accuracy(), "right": self.right, "total": self.total,
                "tokens": self.tokens, "seconds": round(self.seconds, 2), "wrong": self.wrong}  # fmt: skip

    def __str__(self) -> str:
        rows = [f"{k:8s} {self.right[k]:4d}/{self.total[k]:<4d} {self.right[k] / self.total[k]:6.1%}" for k in self.total]
        rate = self.tokens / max(self.seconds, 1e-9)
        rows.append(f"{'all':8s} {sum(self.right.values()):4d}/{sum(self.total.values()):<4d} {self.accuracy()['all']:6.1%}")
        return "\n".join([f"{self.model}: held-out task accuracy (greedy)", *rows,
                          f"{self.tokens} tokens generated in {self.seconds:.1f} s ({rate:.0f} tok/s)"])  # fmt: skip


class Answerer:
    """A loaded model answering one task at a time, greedily, each in a fresh session."""

    def __init__(self, model):
        self.model = model
        self.tokenizer = Tokenizer(model.gguf.kv)
        self.template = ChatTemplate.from_kv(model.gguf.kv)
        self.greedy = make_sampler(temperature=0.0)

    def __call__(self, task: tasks.Task) -> tuple[str, int]:
        """The generated text (after the generation prompt) and its token count."""
        prompt = self.tokenizer.encode(self.template.render(task.messages()))
        budget = len(self.tokenizer.encode(task.response)) + SLACK_TOKENS
        pieces = list(generate(self.model.session(), self.tokenizer, prompt, self.greedy, budget))
        return "".join(p.text for p in pieces), pieces[-1].stats.n_gen


def evaluate(model_path, n: int = 20, kinds=tasks.KINDS, threads: int | None = None, progress=None) -> Report:
    """Answer the first `n` held-out questions of each kind; `progress(i, total)` after each."""
    import r1cpu

    answer = Answerer(r1cpu.load(model_path, threads=threads))
    report, heldout, t0 = Report(str(model_path)), tasks.heldout_tasks(n, kinds), time.perf_counter()
    for i, task in enumerate(heldout):
        text, n_tokens = answer(task)
        ok = tasks.is_correct(task, text)
        report.right[task.kind] = report.right.get(task.kind, 0) + ok
        report.total[task.kind] = report.total.get(task.kind, 0) + 1
        report.tokens += n_tokens
        if not ok:
            report.wrong.append({"question": task.question, "expected": task.answer, "got": tasks.final_answer(text)})
        if progress:
            progress(i + 1, len(heldout))
    report.seconds = time.perf_counter() - t0
    return report


@click.command("eval-tasks")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="questions per task kind")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(tasks.KINDS), help="only these kinds (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (with the wrong answers)")
@click.option("--threads", type=int, default=None, help="compute threads (default: all cores)")
@one_line_errors
def eval_tasks(model, n, kinds, as_json, threads):
    """Held-out reasoning-task accuracy of MODEL per task kind (greedy, chat template, answer after </think>)."""
    show = None if as_json else (lambda i, total: click.echo(f"\r{i}/{total}", nl=i == total, err=True))
    report = evaluate(model, n, kinds or tasks.KINDS, threads, show)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else str(report))
