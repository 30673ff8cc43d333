"""`make demo`: the whole path on the embedded default — make the tiny DeepSeek-V3 checkpoint, convert it
to Q8_0, print the GGUF summary, and run a few greedy decoding steps through the runtime.

    python -m r1cpu.tools.demo OUT_DIR

The weights are random (no DeepSeek weights can be downloaded here), so the generated text is noise;
what the demo shows is that every stage runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from r1cpu.runtime.convert import convert
from r1cpu.runtime.gguf_info import describe
from r1cpu.tools.make_checkpoint import make_checkpoint

PRESET = "tiny-v3"
PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"


def generate(gguf_path: Path, tokenizer: Tokenizer, n_tokens: int = 16) -> None:
    import r1cpu

    model = r1cpu.load(gguf_path)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    session = model.session()
    t0 = time.perf_counter()
    logits = session.prefill(ids)[-1]
    t1 = time.perf_counter()
    out = []
    for _ in range(n_tokens):
        out.append(int(np.argmax(logits)))
        logits = session.decode(out[-1])
    t2 = time.perf_counter()
    print(f"prompt: {PROMPT!r} ({len(ids)} tokens, {len(ids) / (t1 - t0):.0f} tok/s)")
    print(f"greedy: {tokenizer.decode(out)!r} ({n_tokens / (t2 - t1):.1f} tok/s)")


def main(out_dir: str = "out/demo") -> None:
    out = Path(out_dir)
    ckpt = out / PRESET
    if not (ckpt / "config.json").exists():
        make_checkpoint(PRESET, ckpt)
    summary = convert(ckpt, out / f"{PRESET}.q8_0.gguf", "q8_0", force=True)
    print(summary)
    print(describe(summary.path))
    generate(summary.path, Tokenizer.from_file(str(ckpt / "tokenizer.json")))


if __name__ == "__main__":
    main(*sys.argv[1:])
