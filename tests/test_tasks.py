"""runtime/tasks.py: the worked reasoning is right, the held-out split is clean, answers are parsed."""

import random
import re

import pytest

from r1cpu.runtime import tasks


def _tasks(kind, n=300, seed=0):
    rng = random.Random(seed)
    return [tasks.MAKERS[kind](rng) for _ in range(n)]


def _question_numbers(task):
    return [int(x) for x in re.findall(r"\d+", task.question)]


@pytest.mark.parametrize("kind, op", [("add", lambda a, b: a + b), ("mul", lambda a, b: a * b)])
def test_arithmetic_answers_and_every_step(kind, op):
    sym = "+" if kind == "add" else "*"
    step = re.compile(rf"^(\d) \{sym} (\d) \+ (\d) = (\d+)$")
    for task in _tasks(kind):
        a, b = _question_numbers(task)
        assert task.answer == str(op(a, b))
        lines = task.reasoning.split("\n")
        assert lines[0] == f"{a} {sym} {b}, carry 0"
        assert lines[-1].endswith(f"carry 0, so far {task.answer}")
        for line in lines[1::2]:
            x, y, c, s = map(int, step.match(line).groups())
            assert s == op(x, y) + c


def test_compare_answers():
    for task in _tasks("compare"):
        a, b = _question_numbers(task)
        assert a != b
        want = max(a, b) if "larger" in task.question else min(a, b)
        assert task.answer == str(want)
        assert task.reasoning.endswith(f"so {want} is {'larger' if 'larger' in task.question else 'smaller'}")


def test_sort_answers_and_shrinking_lists():
    for task in _tasks("sort"):
        xs = _question_numbers(task)
        assert task.answer == ", ".join(map(str, sorted(xs)))
        last = task.reasoning.split("\n")[-1]
        assert last == f"smallest {max(xs)}; left none; sorted {task.answer}"


def test_count_answers_and_tally():
    for task in _tasks("count"):
        letter, word = re.fullmatch(r"How many times does the letter (\w) appear in (\w+)\?", task.question).groups()
        assert task.answer == str(word.count(letter))
        spelled, tally = task.reasoning.split("\n")
        assert spelled == " ".join(word)
        assert tally.endswith(f"{word[-1]} {task.answer}")


def test_train_stream_never_yields_heldout_questions():
    stream = tasks.train_stream(seed=3)
    seen = [next(stream) for _ in range(3000)]
    assert not any(tasks.is_heldout(t.question) for t in seen)
    assert {t.kind for t in seen} == set(tasks.KINDS)


def test_heldout_set_is_fixed_distinct_and_held_out():
    a, b = tasks.heldout_tasks(12), tasks.heldout_tasks(12)
    assert a == b
    assert all(tasks.is_heldout(t.question) for t in a)
    assert len({t.question for t in a}) == len(a) == 12 * len(tasks.KINDS)
    assert [t.kind for t in a[:12]] == ["add"] * 12
    assert tasks.heldout_tasks(3, kinds=("sort",)) == [t for t in a if t.kind == "sort"][:3]


def test_heldout_fraction_is_about_one_in_ten():
    questions = {t.question for t in _tasks("add", n=4000, seed=9)}
    share = sum(map(tasks.is_heldout, questions)) / len(questions)
    assert 0.07 < share < 0.13


def test_final_answer_and_checking():
    task = tasks.Task("add", "What is 2 + 2?", "2 + 2 = 4", "4")
    assert task.response == "2 + 2 = 4\n</think>\n\n4"
    assert tasks.final_answer("x\n</think>\n\n4<｜end▁of▁sentence｜>") == "4"
    assert tasks.final_answer("a</think>b</think>\n\n 4 ") == "4"
    assert tasks.is_correct(task, task.response)
    assert not tasks.is_correct(task, "2 + 2 = 5\n</think>\n\n5")
    assert not tasks.is_correct(task, "4")  # no </think>: the model never finished thinking
