"""The byte-level BPE tokenizer, rebuilt from a GGUF's `tokenizer.ggml.*` metadata as a HF
`tokenizers.Tokenizer` (docs: deepseek-math.md §9, gguf-deepseek2.md §1 and §3.7).

GGUF keeps the vocabulary, token types and merges but names the pre-tokenizer only by llama.cpp's
`tokenizer.ggml.pre` string, so the splits are copied here verbatim from the published tokenizer.json
files (tests compare them) and looked up by that name. Control (3) and user-defined (4) tokens become
added tokens, matched in raw text before pre-tokenization as HF and llama.cpp both do; unused
`[PAD{i}]` entries (5) are left out of the vocabulary, so they can never be produced.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import tokenizers

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

# DeepSeek-V3/R1: digit runs in threes, CJK runs, then the GPT-4-like word split.
_DEEPSEEK_V3 = [
    _split("\\p{N}{1,3}"),
    _split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
    _split(
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
        "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
    ),
    _BYTE_LEVEL,
]

# DeepSeek-V2 / DeepSeek-LLM: newlines, letter runs (Latin, Greek, Cyrillic, ... with an optional
# leading space), punctuation runs, trailing whitespace, CJK + Hangul runs, then single digits.
_V2_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-"
    "\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_DEEPSEEK_LLM = [
    _split("[\r\n]"),
    _split(_V2_LETTERS),
    _split("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),
    _split("\\s+$"),
    _split("[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"),
    {"type": "Digits", "individual_digits": True},
    _BYTE_LEVEL,
]

# Keyed by llama.cpp's `tokenizer.ggml.pre`. Its converter names the R1/V3 tokenizer `deepseek-v3`
# when the hashed sample carries BOS (transformers 4.x) and `joyai-llm` when it does not (5.x).
PRE_TOKENIZERS = {
    "deepseek-v3": {"type": "Sequence", "pretokenizers": _DEEPSEEK_V3},
    "joyai-llm": {"type": "Sequence", "pretokenizers": _DEEPSEEK_V3},
    "deepseek-llm": {"type": "Sequence", "pretokenizers": _DEEPSEEK_LLM},
}


class TokenizerError(ValueError):
    pass


def _gpt2_char_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map to 256+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_CHAR_TO_BYTE = _gpt2_char_to_byte()


def _piece_bytes(token: str) -> bytes:
    # As the ByteLevel decoder: a token with any char outside the byte alphabet is taken as plain UTF-8.
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _spec(tokens: list[str], types: np.ndarray, merges: list[str], pre: dict) -> dict:
    """tokenizer.json for tokenizers.Tokenizer.from_str.

    Every usable token goes into the BPE vocabulary with its GGUF id, so added tokens resolve to that
    id whatever order tokenizers assigns them in; ids absent from the vocabulary are never produced."""
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind != TOKEN_UNUSED:
            vocab.setdefault(tok, i)
    added = [
        {"id": int(i), "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": bool(types[i] == TOKEN_CONTROL)}
        for i in np.flatnonzero((types == TOKEN_CONTROL) | (types == TOKEN_USER_DEFINED))
    ]  # fmt: skip
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": list(merges)}  # fmt: skip
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": pre, "model": model,
            "post_processor": {**_BYTE_LEVEL, "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            "decoder": {**_BYTE_LEVEL, "add_prefix_space": True, "use_regex": True}}  # fmt: skip


def _need(kv: dict, key: str):
    if key not in kv:
        raise TokenizerError(f"GGUF has no {key}: cannot build the tokenizer")
    return kv[key]


class Tokenizer:
    """encode/decode with exactly the ids of the original tokenizer.json; see StreamDecoder for output."""

    def __init__(self, kv: dict):
        if (model := _need(kv, "tokenizer.ggml.model")) != "gpt2":
            raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r} (only byte-level BPE 'gpt2')")
        pre_name = kv.get("tokenizer.ggml.pre", "default")
        if pre_name not in PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre_name!r} (known: {', '.join(PRE_TOKENIZERS)})")
        self.tokens: list[str] = list(_need(kv, "tokenizer.ggml.tokens"))
        self.types = np.asarray(_need(kv, "tokenizer.ggml.token_type"), dtype=np.int32)
        if len(self.types) != len(self.tokens):
            raise TokenizerError(f"{len(self.tokens)} tokens but {len(self.types)} token types")
        merges = _need(kv, "tokenizer.ggml.merges")
        spec = _spec(self.tokens, self.types, merges, PRE_TOKENIZERS[pre_name])
        self.hf = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
        self.bos_id = _opt_id(kv.get("tokenizer.ggml.bos_token_id"))
        self.eos_id = _opt_id(kv.get("tokenizer.ggml.eos_token_id"))
        self.add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", False)) and self.bos_id is not None
        self._bytes: dict[int, bytes] = {}  # id -> raw bytes, filled as tokens are streamed

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        from r1cpu.runtime.gguf_reader import GGUFFile

        return cls(GGUFFile(path).kv)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokens[token_id]

    def is_control(self, token_id: int) -> bool:
        return int(self.types[token_id]) == TOKEN_CONTROL

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for; none for unused ids (a model can still emit one), as in decode."""
        if token_id not in self._bytes:
            unused = int(self.types[token_id]) == TOKEN_UNUSED
            self._bytes[token_id] = b"" if unused else _piece_bytes(self.tokens[token_id])
        return self._bytes[token_id]


def _opt_id(v) -> int | None:
    return None if v is None else int(v)


class StreamDecoder:
    """Token ids in, text out, never half a UTF-8 character: bytes are accumulated and an incomplete
    trailing sequence is held back until it completes (invalid bytes become U+FFFD, as in decode)."""

    def __init__(self, tokenizer: Tokenizer, skip_control: bool = False):
        self.tokenizer, self.skip_control = tokenizer, skip_control
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_control and self.tokenizer.is_control(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
