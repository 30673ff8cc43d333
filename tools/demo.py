"""`make demo`: `r1cpu chat` on the embedded default model, the tiny R1 (a 2 M parameter
DeepSeek-V3-architecture model trained by tools/train_tiny_r1.py, shipped as runtime/data/tiny-r1.q8_0.gguf).

    python -m r1cpu.tools.demo

On a terminal this is the interactive chat; without one (CI) it pipes one held-out question through
the same chat loop. The model reasons inside <think>…</think> on the five task kinds of
runtime/tasks.py (adding, multiplying by one digit, comparing, sorting, counting a letter), phrased as
there; anything else gets confident nonsense.
"""

from __future__ import annotations

import sys

from r1cpu.runtime.chat_cli import DEFAULT_MODEL
from r1cpu.runtime.gguf_info import describe

QUESTION = "What is 476 * 6?"  # held out from training (runtime/tasks.py)
MAX_TOKENS = 400  # the longest worked answer is about 170 tokens


def main() -> None:
    import r1cpu
    from r1cpu.runtime.chat import run_chat
    from r1cpu.runtime.chat_session import Conversation
    from r1cpu.runtime.chat_template import ChatTemplate
    from r1cpu.runtime.sampler import make_sampler
    from r1cpu.runtime.tokenizer import Tokenizer

    print(describe(DEFAULT_MODEL))
    model = r1cpu.load(DEFAULT_MODEL)
    conv = Conversation(model, Tokenizer(model.gguf.kv), ChatTemplate.from_kv(model.gguf.kv))
    lines = None if sys.stdin.isatty() else [QUESTION]
    # Greedy: a 2 M parameter model's worked steps are exact only at its most likely token.
    run_chat(conv, make_sampler(temperature=0.0), MAX_TOKENS, lines=lines)


if __name__ == "__main__":
    main()
