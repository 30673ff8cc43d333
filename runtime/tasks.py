"""Checkable reasoning tasks for the tiny R1: generator, held-out split and answer checker.

The training script (tools/train_tiny_r1.py) learns from these and `r1cpu eval-tasks` measures a model
on the held-out ones, so both see exactly the same formats. No torch, no numpy: plain `random`.

Each task is a user question, a worked reasoning text (what goes inside `<think>…</think>`) and a short
answer. The reasoning is written so that every step depends only on nearby, recent text: the numbers
shrink from the right one digit per line while the result grows on the left, and lists shrink one
element per line, so a small model copies and looks up instead of counting positions.

Held-out split: a question is held out when the hash of its text says so (1 in 10), for every kind;
training never sees those questions, evaluation sees only those.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

KINDS = ("add", "mul", "compare", "sort", "count")
HELDOUT_ONE_IN = 10


@dataclass(frozen=True)
class Task:
    kind: str
    question: str
    reasoning: str  # inside <think>…</think>, without the tags
    answer: str

    @property
    def response(self) -> str:
        """The assistant's text after R1's generation prompt `<｜Assistant｜><think>\\n`."""
        return f"{self.reasoning}\n</think>\n\n{self.answer}"

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]


def is_heldout(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_ONE_IN == 0


# ---------------------------------------------------------------- arithmetic, right to left


def _column_steps(a: int, b: int, op: str, combine: Callable[[int, int, int], int]) -> tuple[list[str], str]:
    """Worked lines for a column-by-column `a op b`; b is one digit when op is `*` (it never shrinks)."""
    shrink_b = op == "+"
    lines, carry, result = [f"{a} {op} {b}, carry 0"], 0, ""
    while a or carry or (shrink_b and b):
        da, db = a % 10, (b % 10 if shrink_b else b)
        s = combine(da, db, carry)
        lines.append(f"{da} {op} {db} + {carry} = {s}")
        a, b = a // 10, (b // 10 if shrink_b else b)
        carry, result = s // 10, f"{s % 10}{result}"
        lines.append(f"{a} {op} {b}, carry {carry}, so far {result}")
    return lines, result


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def make_add(rng: random.Random) -> Task:
    a, b = _number(rng, rng.randint(2, 3)), _number(rng, rng.randint(1, 3))
    if rng.random() < 0.5:
        a, b = b, a
    lines, result = _column_steps(a, b, "+", lambda x, y, c: x + y + c)
    assert int(result) == a + b
    return Task("add", f"What is {a} + {b}?", "\n".join(lines), result)


def make_mul(rng: random.Random) -> Task:
    a, m = _number(rng, rng.randint(2, 3)), rng.randint(2, 9)
    lines, result = _column_steps(a, m, "*", lambda x, y, c: x * y + c)
    assert int(result) == a * m
    return Task("mul", f"What is {a} * {m}?", "\n".join(lines), result)


# ---------------------------------------------------------------- compare, left to right


def _compare_lines(a: int, b: int, word: str) -> list[str]:
    sa, sb = str(a), str(b)
    lines = [f"{sa} has {len(sa)} digits, {sb} has {len(sb)} digits"]
    if len(sa) == len(sb):
        for x, y in zip(sa, sb):
            lines.append(f"{x} {'=' if x == y else ('>' if x > y else '<')} {y}")
            if x != y:
                break
    else:
        lines.append("more digits is larger")
    winner = max(a, b) if word == "larger" else min(a, b)
    lines.append(f"so {winner} is {word}")
    return lines


def make_compare(rng: random.Random) -> Task:
    digits = rng.randint(1, 4)
    a = _number(rng, digits)
    if rng.random() < 0.6 and digits > 1:  # share a prefix, so the digit walk goes past the first
        keep = rng.randint(1, digits - 1)
        b = int(str(a)[:keep] + str(_number(rng, digits - keep)).zfill(digits - keep))
    else:
        b = _number(rng, rng.randint(1, 4))
    if a == b:
        b = a + 1
    word = rng.choice(("larger", "smaller"))
    answer = str(max(a, b) if word == "larger" else min(a, b))
    return Task("compare", f"Which is {word}, {a} or {b}?", "\n".join(_compare_lines(a, b, word)), answer)


# ---------------------------------------------------------------- sort, selection by minimum


def _join(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if xs else "none"


def make_sort(rng: random.Random) -> Task:
    xs = [rng.randrange(100) for _ in range(rng.randint(3, 4))]
    left, done, lines = list(xs), [], [_join(xs)]
    while left:
        smallest = min(left)
        left.remove(smallest)
        done.append(smallest)
        lines.append(f"smallest {smallest}; left {_join(left)}; sorted {_join(done)}")
    return Task("sort", f"Sort {_join(xs)} from smallest to largest.", "\n".join(lines), _join(done))


# ---------------------------------------------------------------- count letters, spell then tally

WORDS = """
apple banana cherry grape lemon mango melon orange peach pear plum berry strawberry blueberry
raspberry coconut papaya tomato potato carrot pepper onion garlic ginger butter cheese bread pizza
pasta coffee cookie sugar honey water river ocean island forest garden flower summer winter spring
autumn morning evening letter number circle square yellow purple silver golden little simple happy
pretty window mirror pillow rabbit kitten puppy monkey donkey turkey parrot penguin giraffe zebra
tiger lion horse mouse camel eagle falcon dragon planet rocket galaxy comet moon star cloud rain
thunder pencil paper bottle basket button school teacher doctor banner hammer ladder bubble puzzle
balloon battle middle common address success committee mississippi assessment
""".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_count(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
    tally, n = [], 0
    for ch in word:
        n += ch == letter
        tally.append(f"{ch} {n}")
    reasoning = f"{' '.join(word)}\ncount {letter}: {', '.join(tally)}"
    return Task("count", f"How many times does the letter {letter} appear in {word}?", reasoning, str(n))


# ---------------------------------------------------------------- streams and checking

MAKERS: dict[str, Callable[[random.Random], Task]] = {
    "add": make_add, "mul": make_mul, "compare": make_compare, "sort": make_sort, "count": make_count,
}  # fmt: skip
TRAIN_MIX = {"add": 0.25, "mul": 0.25, "compare": 0.15, "sort": 0.2, "count": 0.15}


def train_stream(seed: int) -> Iterator[Task]:
    """An endless mix of tasks, none of them held out."""
    rng = random.Random(seed)
    kinds, weights = zip(*TRAIN_MIX.items())
    while True:
        task = MAKERS[rng.choices(kinds, weights)[0]](rng)
        if not is_heldout(task.question):
            yield task


def heldout_tasks(n: int, kinds=KINDS, seed: int = 1234) -> list[Task]:
    """The first `n` distinct held-out questions of each kind, from a fixed seed."""
    out = []
    for kind in kinds:
        rng, seen = random.Random(f"{seed}-{kind}"), set()
        while len(seen) < n:
            task = MAKERS[kind](rng)
            if is_heldout(task.question) and task.question not in seen:
                seen.add(task.question)
                out.append(task)
    return out


def final_answer(text: str) -> str:
    """What the model answered: the text after the last `</think>`, without the end-of-turn marker."""
    answer = text.rsplit("</think>", 1)[-1] if "</think>" in text else ""
    return answer.replace("<｜end▁of▁sentence｜>", "").strip()


def is_correct(task: Task, generated: str) -> bool:
    return final_answer(generated) == task.answer
