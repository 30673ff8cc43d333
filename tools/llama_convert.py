"""Run llama.cpp's own `convert_hf_to_gguf.py` on a checkpoint folder (an oracle, for interop tests).

    python -m r1cpu.tools.llama_convert LLAMA_CPP_DIR SRC_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0]

LLAMA_CPP_DIR is llama.cpp's source tree, e.g. `vendor/llama.cpp` of the llama-cpp-python source
distribution (`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`); it needs torch.
Its converter recognises pre-tokenizers by hashing a sample's token ids, which our trimmed test
tokenizers change, so the name is supplied here from the tokenizer's structure instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r1cpu.runtime.convert_meta import pre_tokenizer_name


def run(llama_dir: Path, src: Path, out: Path, outtype: str = "f32") -> None:
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    import convert_hf_to_gguf  # noqa: E402  (from llama_dir)
    from conversion import base  # noqa: E402

    pre = pre_tokenizer_name(json.loads((src / "tokenizer.json").read_text()), src)
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = ["convert_hf_to_gguf.py", str(src), "--outfile", str(out), "--outtype", outtype]
    convert_hf_to_gguf.main()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("llama_dir", type=Path)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", default="f32")
    a = ap.parse_args()
    run(a.llama_dir, a.src, a.out, a.outtype)


if __name__ == "__main__":
    main()
