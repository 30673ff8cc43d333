"""`make demo`: `r1cpu chat` on the embedded default model, built on first use (the tiny DeepSeek-V3
checkpoint with the real R1 tokenizer, converted to Q8_0).

    python -m r1cpu.tools.demo

On a terminal this is the interactive chat; without one (CI) it pipes one question through the same
chat loop. The weights are random (no DeepSeek weights can be downloaded here), so the answers are
noise; what the demo shows is that every stage runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from r1cpu.runtime.convert import convert
from r1cpu.runtime.gguf_info import describe
from r1cpu.tools.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The embedded default model of `r1cpu chat` and `make demo`: replace this one line (and the preset
# it is built from) when a trained tiny model takes over.
DEFAULT_MODEL = ROOT / "out" / "demo" / "tiny-v3.q8_0.gguf"
PRESET = "tiny-v3"
QUESTION = "What is 2+2?"
MAX_TOKENS, SEED = 64, 0


def default_model() -> Path:
    """DEFAULT_MODEL, made (checkpoint, then Q8_0 conversion) when missing."""
    if not DEFAULT_MODEL.exists():
        ckpt = DEFAULT_MODEL.parent / PRESET
        print(f"building the default model {DEFAULT_MODEL} ...", file=sys.stderr)
        if not (ckpt / "config.json").exists():
            make_checkpoint(PRESET, ckpt)
        convert(ckpt, DEFAULT_MODEL, "q8_0", force=True)
    return DEFAULT_MODEL


def main() -> None:
    import r1cpu
    from r1cpu.runtime.chat import run_chat
    from r1cpu.runtime.chat_session import Conversation
    from r1cpu.runtime.chat_template import ChatTemplate
    from r1cpu.runtime.sampler import make_sampler
    from r1cpu.runtime.tokenizer import Tokenizer

    path = default_model()
    print(describe(path))
    model = r1cpu.load(path)
    conv = Conversation(model, Tokenizer(model.gguf.kv), ChatTemplate.from_kv(model.gguf.kv))
    lines = None if sys.stdin.isatty() else [QUESTION]
    run_chat(conv, make_sampler(seed=SEED), MAX_TOKENS, lines=lines)


if __name__ == "__main__":
    main()
