"""A conversation over one Session: messages rendered through the chat template, the KV cache kept
across turns, and the reasoning (`<think>...</think>`) told apart from the answer.

Turns reuse the cache: the new prompt is compared with the tokens already in the cache and only the
part after their longest common prefix is prefilled. The R1 template strips earlier reasoning, so
the new prompt usually branches off inside the previous answer; the cache is rolled back to there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from r1cpu.runtime.chat_template import ChatTemplate
from r1cpu.runtime.generate import ContextFullError, Stats, generate
from r1cpu.runtime.sampler import Sampler
from r1cpu.runtime.tokenizer import Tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ChatPiece:
    kind: str  # "think" | "answer"
    text: str


class ThinkSplitter:
    """Labels streamed text as reasoning or answer; tags may arrive split across pieces."""

    def __init__(self, thinking: bool):
        self.thinking, self.pending = thinking, ""

    def feed(self, text: str) -> list[ChatPiece]:
        self.pending += text
        out = []
        while True:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            i = self.pending.find(tag)
            if i < 0:
                break
            out.append(ChatPiece(self._kind, self.pending[:i]))
            self.pending, self.thinking = self.pending[i + len(tag) :], not self.thinking
        hold = next((n for n in range(len(tag) - 1, 0, -1) if self.pending.endswith(tag[:n])), 0)
        cut = len(self.pending) - hold
        out.append(ChatPiece(self._kind, self.pending[:cut]))
        self.pending = self.pending[cut:]
        return [p for p in out if p.text]

    def flush(self) -> list[ChatPiece]:
        out, self.pending = self.pending, ""
        return [ChatPiece(self._kind, out)] if out else []

    @property
    def _kind(self) -> str:
        return "think" if self.thinking else "answer"


def ends_in_thought(prompt: str) -> bool:
    """True if the prompt leaves a `<think>` open (R1's generation prompt ends with `<think>\\n`)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Conversation:
    """messages + the tokens whose keys/values the session holds (`cached`, always == session.n_past)."""

    def __init__(self, model, tokenizer: Tokenizer, template: ChatTemplate, n_ctx: int | None = None,
                 drop_oldest: bool = False):  # fmt: skip
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.session = model.session(n_ctx)
        self.drop_oldest = drop_oldest
        self.messages: list[dict] = []
        self.cached: list[int] = []
        self.last_stats: Stats | None = None
        self.last_thought = ""
        self.dropped = 0  # turns dropped to fit the context, over the conversation

    @property
    def n_ctx(self) -> int:
        return self.session.cache.n_ctx

    def reset(self) -> None:
        """Forget the turns (the system prompt stays); the cache is rolled back on the next turn."""
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def set_system(self, text: str) -> None:
        self.messages = [{"role": "system", "content": text}] + [m for m in self.messages if m["role"] != "system"]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"messages": self.messages}, ensure_ascii=False, indent=2) + "\n")

    def load(self, path: str | Path) -> None:
        try:
            messages = json.loads(Path(path).read_text())["messages"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a saved conversation ({e})") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                     for m in messages):  # fmt: skip
            raise ValueError(f"{path}: every message needs a role and a content")
        self.messages = messages

    def ask(self, text: str, sampler: Sampler, max_tokens: int) -> Iterator[ChatPiece]:
        """Add a user turn and stream the reply; the reply (even a cut-off one) joins the messages."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt_text, prompt = self._fitting_prompt(max_tokens)
        except ValueError:  # a full context or a template error: the turn is not kept
            self.messages.pop()
            raise
        keep = min(common_prefix(self.cached, prompt), len(prompt) - 1)
        self.session.cache.truncate(keep)
        self.cached = prompt[:keep]
        yield from self._reply(prompt, keep, ends_in_thought(prompt_text), sampler, max_tokens)

    def _reply(self, prompt, keep, thinking, sampler, max_tokens) -> Iterator[ChatPiece]:
        splitter, generated, raw, thought = ThinkSplitter(thinking), [], [], []
        stats = Stats(n_prompt=len(prompt) - keep)
        try:
            for piece in generate(self.session, self.tokenizer, prompt[keep:], sampler, max_tokens, context=prompt):
                stats = piece.stats
                generated += [] if piece.token is None else [piece.token]
                raw.append(piece.text)
                for p in splitter.feed(piece.text) + (splitter.flush() if piece.token is None else []):
                    thought += [p.text] if p.kind == "think" else []
                    yield p
        finally:
            # Also on Ctrl-C: the cache holds exactly the first n_past of prompt + generated tokens.
            self.cached = (prompt + generated)[: self.session.n_past]
            self.last_stats, self.last_thought = stats, "".join(thought)
            self._end_turn("".join(raw), splitter.thinking, interrupted=stats.stop_reason is None)

    def _end_turn(self, reply: str, open_thought: bool, interrupted: bool) -> None:
        if interrupted and not reply:  # stopped before the first token: as if never asked
            self.messages.pop()
            return
        # A reply cut off mid-thought gets its thought closed, so the template treats the text as
        # reasoning (R1's drops it) rather than as the answer.
        close = "\n" + THINK_CLOSE + "\n\n" if open_thought else ""
        self.messages.append({"role": "assistant", "content": reply + close})

    def _fitting_prompt(self, max_tokens: int) -> tuple[str, list[int]]:
        """The rendered prompt and its ids; oldest turns dropped first when drop_oldest is set."""
        while True:
            text = self.template.render(self.messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text)
            room = min(max_tokens, self.n_ctx // 4)  # leave the reply some space when dropping
            if len(ids) < self.n_ctx and (not self.drop_oldest or len(ids) + room <= self.n_ctx):
                return text, ids
            if not self.drop_oldest or not self._drop_oldest_turn():
                raise ContextFullError(f"the conversation needs {len(ids)} tokens but the context holds "
                                       f"{self.n_ctx} (/reset, or start the chat with --drop-oldest)")  # fmt: skip

    def _drop_oldest_turn(self) -> bool:
        """Remove the oldest user turn and the replies up to the next one; never the newest turn."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if len(users) < 2:
            return False
        del self.messages[users[0] : users[1]]
        self.dropped += 1
        return True
