"""`r1cpu chat` driven through a pseudo-terminal (pexpect), on the tiny random-weight model: the
answers are noise, what is checked is the terminal behaviour."""

import os
import sys

import pytest

from r1cpu.runtime.convert import convert

pexpect = pytest.importorskip("pexpect")

STATUS = r"prompt \d+ tok, [\d.]+ tok/s \| gen (\d+) tok, [\d.]+ tok/s \| ctx (\d+)/1280 \| rss \d+ MiB"
PROMPT = ">>>"
DIM = "\x1b[2m"  # rich's style for the streamed reasoning
TIMEOUT = 90  # seconds per expectation: 2 cores are shared with other test runs


@pytest.fixture(scope="module")
def gguf(checkpoints, tmp_path_factory):
    return convert(checkpoints["tiny-v3"], tmp_path_factory.mktemp("tty") / "tiny-v3.q8_0.gguf", "q8_0").path


def spawn(gguf, *args):
    # No cursor-position requests: pexpect is not a terminal that would answer them.
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    code = "from r1cpu.runtime.cli import main; main()"
    child = pexpect.spawn(sys.executable, ["-c", code, "chat", str(gguf), "--temp", "0", *args], env=env,
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 160))  # fmt: skip
    child.expect(PROMPT)
    return child


def ask(child, line):
    child.sendline(line)
    child.expect_exact(line)  # the echo of what was typed


def test_question_gets_a_streamed_answer_and_a_status_line(gguf):
    child = spawn(gguf, "-n", "6")
    ask(child, "What is 2+2?")
    child.expect_exact(DIM)  # reasoning text starts streaming (R1's prompt opens a <think>)
    child.expect(STATUS)
    assert child.match.group(1) == "6"
    first_ctx = int(child.match.group(2))
    child.expect(PROMPT)
    ask(child, "And 3+3?")
    child.expect(STATUS)
    assert int(child.match.group(2)) > first_ctx  # the conversation grows in the same cache
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_reset_clears(gguf):
    child = spawn(gguf, "-n", "5000")
    ask(child, "Tell me a very long story.")
    child.expect_exact(DIM)
    child.sendintr()  # mid-answer: 5000 tokens would take minutes
    child.expect_exact("[interrupted]")
    child.expect(STATUS)
    assert 0 < int(child.match.group(1)) < 5000
    child.expect(PROMPT)
    ask(child, "/stats")
    child.expect_exact("1 turns, 2 messages")  # the cut-off answer stayed in the conversation
    child.expect(PROMPT)
    ask(child, "/reset")
    child.expect_exact("conversation cleared")
    child.expect(PROMPT)
    ask(child, "/stats")
    child.expect_exact("0 turns, 0 messages")
    child.expect(PROMPT)
    ask(child, "/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
