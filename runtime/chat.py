"""`r1cpu chat`: the interactive terminal over a Conversation.

Input comes from prompt_toolkit on a terminal (history, Esc-Enter or Alt-Enter for a new line, pasted
blocks kept whole) or, for scripts, one message per line from a pipe (a trailing backslash continues
the line). Output goes through rich: the reasoning dimmed (or folded), the answer plain, and a status
line after each answer. Ctrl-C stops an answer and keeps the conversation; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import sys
from contextlib import closing
from typing import Callable, Iterable

import psutil
from rich.console import Console

from r1cpu.runtime.chat_session import Conversation
from r1cpu.runtime.sampler import Sampler

HELP = """commands:
  /help              this text
  /reset             forget the conversation (the system prompt stays)
  /system TEXT       set the system prompt (no TEXT: show it)
  /save FILE         write the conversation as JSON      /load FILE   read one back
  /stats             token counts, speeds, context and memory
  /think show|hide   show the reasoning while it streams, or fold it (/think alone: the last one)
  /exit              leave (also Ctrl-D); Ctrl-C stops the current answer
Enter sends; Esc-Enter or Alt-Enter starts a new line."""

PROMPT = ">>> "
THINK_STYLE, INFO_STYLE, ERROR_STYLE = "dim", "dim cyan", "bold red"


def status_line(conv: Conversation) -> str:
    s = conv.last_stats
    rss = psutil.Process().memory_info().rss / 2**20
    return (f"prompt {s.n_prompt} tok, {s.prompt_tps:.1f} tok/s | gen {s.n_gen} tok, {s.gen_tps:.1f} tok/s | "
            f"ctx {conv.session.n_past}/{conv.n_ctx} | rss {rss:.0f} MiB")  # fmt: skip


class TerminalChat:
    def __init__(self, conv: Conversation, sampler: Sampler, console: Console,
                 read: Callable[[], str | None], max_tokens: int, show_think: bool = True):  # fmt: skip
        self.conv, self.sampler, self.console, self.read = conv, sampler, console, read
        self.max_tokens, self.show_think = max_tokens, show_think
        self.experts_before: dict | None = None  # --max-ram: expert-cache counters as the last answer began

    def run(self) -> None:
        self.info(f"{self.conv.n_ctx}-token context; /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:  # at the prompt: drop the line being typed
                continue
            if line is None or not self.handle(line.strip()):
                return

    def handle(self, line: str) -> bool:
        """Answer a message or run a command; False means leave."""
        if not line:
            return True
        if not line.startswith("/"):
            self.answer(line)
            return True
        name, _, arg = line[1:].partition(" ")
        if name in ("exit", "quit"):
            return False
        command = getattr(self, f"cmd_{name}", None)
        if command is None:
            self.error(f"unknown command /{name} (/help lists them)")
            return True
        try:
            command(arg.strip())
        except (ValueError, OSError) as e:  # a bad file or argument: say so, keep chatting
            self.error(str(e))
        return True

    def answer(self, text: str) -> None:
        view = {"kind": None, "strip": True, "open_line": False}
        cache = getattr(self.conv.model, "expert_cache", None)
        self.experts_before = cache.totals() if cache is not None else None  # for /stats
        try:
            with closing(self.conv.ask(text, self.sampler, self.max_tokens)) as pieces:
                for piece in pieces:
                    self._show(piece, view)
        except ValueError as e:  # a full context (ContextFullError) or a template error
            self._end_line(view)
            self.error(str(e))
            return
        except KeyboardInterrupt:
            self._end_line(view)
            self.info("[interrupted]")
        self._end_line(view)
        self.info(status_line(self.conv))

    def _show(self, piece, view: dict) -> None:
        folded = piece.kind == "think" and not self.show_think
        if piece.kind != view["kind"]:  # a new section: own line, leading newlines dropped
            self._end_line(view)
            view.update(kind=piece.kind, strip=True)
            if folded:
                self.info("[thinking… /think shows it afterwards]")
        text = piece.text.lstrip("\n") if view["strip"] else piece.text
        if folded or not text:
            return
        self.say(text, THINK_STYLE if piece.kind == "think" else None, end="")
        view.update(strip=False, open_line=not text.endswith("\n"))

    def _end_line(self, view: dict) -> None:
        if view["open_line"]:
            self.console.print()
            view["open_line"] = False

    def say(self, text: str, style: str | None = None, end: str = "\n") -> None:
        # Model text is printed as is: no rich markup or highlighting, no inserted line breaks.
        self.console.print(text, style=style, end=end, markup=False, highlight=False, soft_wrap=True)

    def info(self, text: str) -> None:
        self.say(text, INFO_STYLE)

    def error(self, text: str) -> None:
        self.say(text, ERROR_STYLE)

    # commands: cmd_<name>(arg)
    def cmd_help(self, arg: str) -> None:
        self.say(HELP)

    def cmd_reset(self, arg: str) -> None:
        self.conv.reset()
        self.info("[reset] conversation cleared")

    def cmd_system(self, arg: str) -> None:
        if arg:
            self.conv.set_system(arg)
        system = [m["content"] for m in self.conv.messages if m["role"] == "system"]
        self.info(f"system prompt: {system[0]!r}" if system else "no system prompt")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise ValueError("usage: /save FILE")
        self.conv.save(arg)
        self.info(f"saved {len(self.conv.messages)} messages to {arg}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise ValueError("usage: /load FILE")
        self.conv.load(arg)
        self.info(f"loaded {len(self.conv.messages)} messages from {arg}")

    def cmd_stats(self, arg: str) -> None:
        c = self.conv
        turns = sum(m["role"] == "user" for m in c.messages)
        self.info(f"{turns} turns, {len(c.messages)} messages, {c.dropped} dropped to fit; "
                  f"cache {c.session.n_past}/{c.n_ctx} tokens ({c.session.cache.nbytes / 2**20:.1f} MiB)")  # fmt: skip
        if c.last_stats is not None:
            self.info("last answer: " + status_line(c) + f" | stop: {c.last_stats.stop_reason or 'interrupted'}")
        cache = getattr(c.model, "expert_cache", None)
        if cache is not None:  # --max-ram: expert hits, misses and disk reads
            n = c.last_stats.n_prompt + c.last_stats.n_gen if c.last_stats else 0
            self.info("last answer " + cache.summary(self.experts_before, n))
            self.info("since load  " + cache.summary())

    def cmd_think(self, arg: str) -> None:
        if arg in ("show", "hide"):
            self.show_think = arg == "show"
            self.info(f"reasoning {'shown' if self.show_think else 'folded'}")
        elif not arg:
            self.say(self.conv.last_thought or "(no reasoning yet)", THINK_STYLE)
        else:
            raise ValueError("usage: /think show|hide")


def tty_reader(history_file: str | None = None) -> Callable[[], str | None]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")  # Alt-Enter arrives as Esc then Enter
    def _newline(event):
        event.current_buffer.insert_text("\n")

    history = FileHistory(history_file) if history_file else InMemoryHistory()
    session = PromptSession(history=history, key_bindings=keys)

    def read() -> str | None:
        try:
            return session.prompt(PROMPT, prompt_continuation="... ")
        except EOFError:
            return None

    return read


def line_reader(lines: Iterable[str], console: Console) -> Callable[[], str | None]:
    """One message per line; a line ending in a backslash continues on the next. Echoed for transcripts."""
    it = iter(lines)

    def read() -> str | None:
        parts = []
        for raw in it:
            line = raw.rstrip("\r\n")
            parts.append(line[:-1] if line.endswith("\\") else line)
            if not line.endswith("\\"):
                break
        else:
            if not parts:
                return None
        text = "\n".join(parts)
        console.print(PROMPT + text, markup=False, highlight=False, soft_wrap=True)
        return text

    return read


def run_chat(conv: Conversation, sampler: Sampler, max_tokens: int, show_think: bool = True,
             lines: Iterable[str] | None = None, history_file: str | None = None) -> None:  # fmt: skip
    """Interactive on a terminal; otherwise reads `lines` (default: stdin) as messages."""
    console = Console(highlight=False)
    if lines is None and sys.stdin.isatty():
        read = tty_reader(history_file)
    else:
        read = line_reader(sys.stdin if lines is None else lines, console)
    TerminalChat(conv, sampler, console, read, max_tokens, show_think).run()
