"""The tokenizer rebuilt from GGUF metadata gives exactly the ids of HF `tokenizers` on the original
tokenizer.json (real R1 and V2 tokenizers), decodes identically, and streams without broken characters."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from r1cpu.runtime.convert_meta import write_tokenizer
from r1cpu.runtime.gguf_reader import GGUFFile
from r1cpu.runtime.gguf_writer import GGUFWriter
from r1cpu.runtime.tokenizer import PRE_TOKENIZERS, TOKEN_UNUSED, StreamDecoder, Tokenizer, TokenizerError

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
# (fixture folder, GGUF vocab size: the released embedding rows, so [PAD] entries exist as in real files)
REAL = {"deepseek-r1": 129280, "deepseek-v2": 102400}

HAND_WRITTEN = [
    "Hello world", "DeepSeek", "1234567 apples", "你好，世界！", "<think>\nhi</think>",
    "  leading spaces\n\n\ttab", "it's e.g. x+y=12.5%",
    "The quick brown fox jumps over the lazy dog. Don't you think?",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "{\"key\": [1, 2, 3], \"nested\": {\"ok\": true}}",
    "日本語のテキストとカタカナ、ひらがな。漢字も。", "深度求索的模型很强大。2024年1月1日",
    "한국어 문장도 있습니다.", "Ελληνικά και русский текст", "مرحبا بالعالم",
    "3.14159265358979 and 1,000,000 and 0x1F and 00007", "١٢٣ ٤٥٦ (Arabic-Indic digits) ⅫⅣ ½",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣", "a\u00a0b\u3000c\u2009d\u200be\ufeff",
    "\r\n\r\nwindows lines\r\n", "trailing spaces   ", "   ", "\n", "\t\t\n  \n",
    "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n",
    "text<｜end▁of▁sentence｜>more", "<｜place▁holder▁no▁7｜>x<|EOT|>y",
    "half <｜User not a token ｜> and <think mid", "</think></think><think>",
    "[PAD128900] looks like a pad", "mixed: café naïve résumé Ångström ß ẞ",
    "math: ∑_{i=1}^{n} i² = n(n+1)/2, √2 ≈ 1.414, ∞ ≠ 0",
    "URL https://example.com/a/b?c=d&e=f#g and email a.b@c.de",
    "   indented\n\tcode\n        block", "CamelCaseWord snake_case_word kebab-case-word",
    "ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３！", "…—–‘’“”«»", "\x00\x01\x7f control bytes",
]  # fmt: skip

FRAGMENTS = [
    "hello", " world", "DeepSeek", "R1", "123", "4567", "0.5", "你好", "世界", "カタカナ", "ひらがな",
    "😀", "🎉", "👍🏽", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "!", "?!", "...",
    "()", "[x]", "{y}", "<think>", "</think>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>",
    "x+y=z", "it's", "don't", "é", "ß", "Ω", "ℵ", "def", "return", "==", "->", "//", "#", "$", "%",
]  # fmt: skip


def corpus(n_random: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    mixed = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 12))) for _ in range(n_random)]
    return HAND_WRITTEN + mixed + ["\n\n".join(HAND_WRITTEN)]


def gguf_kv(tmp_path: Path, src: Path, n_vocab: int) -> dict:
    """The tokenizer.ggml.* metadata our converter writes for src, read back from a tensor-less GGUF."""
    w = GGUFWriter()
    write_tokenizer(w, src, n_vocab, {})
    path = tmp_path / f"{src.name}.gguf"
    with open(path, "wb") as f:
        w.write_header(f)
    w.finish()
    return GGUFFile(path).kv


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """name -> (our Tokenizer from GGUF metadata, HF tokenizers.Tokenizer from the original tokenizer.json)."""
    out = {}
    for name, n_vocab in REAL.items():
        kv = gguf_kv(tmp_path_factory.mktemp("tok"), FIXTURES / name, n_vocab)
        out[name] = Tokenizer(kv), tokenizers.Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
    return out


@pytest.fixture(params=sorted(REAL))
def pair(request, real):
    return real[request.param]


def test_pre_tokenizers_are_the_published_ones():
    r1 = json.loads((FIXTURES / "deepseek-r1" / "tokenizer.json").read_text())["pre_tokenizer"]
    v2 = json.loads((FIXTURES / "deepseek-v2" / "tokenizer.json").read_text())["pre_tokenizer"]
    assert PRE_TOKENIZERS["deepseek-v3"] == r1 and PRE_TOKENIZERS["joyai-llm"] == r1
    assert PRE_TOKENIZERS["deepseek-llm"] == v2


def test_ids_equal_hf_on_corpus(pair):
    ours, hf = pair
    texts = corpus()
    mismatches = [t for t in texts if ours.encode(t) != hf.encode(t, add_special_tokens=False).ids]
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, first: {mismatches[0]!r}"


def test_decode_equals_hf_and_never_yields_unused_ids(pair):
    ours, hf = pair
    for text in corpus(n_random=50):
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert all(ours.types[i] != TOKEN_UNUSED for i in ids)
    unused = int(np.flatnonzero(ours.types == TOKEN_UNUSED)[0])  # the padded ids exist, as [PAD] entries
    assert ours.decode([unused]) == hf.decode([unused]) == "" and ours.token_bytes(unused) == b""


def test_streaming_never_splits_a_character(pair):
    ours, _ = pair
    for text in corpus(n_random=50):
        decoder = StreamDecoder(ours)
        pieces = [decoder.push(i) for i in ours.encode(text)] + [decoder.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces), text  # a split emoji would show up as U+FFFD


def test_streaming_holds_back_partial_sequence(pair):
    ours, _ = pair
    ids = ours.encode("👨‍👩‍👧‍👦")
    assert len(ids) > 1  # the family emoji spans several byte-level tokens
    decoder = StreamDecoder(ours)
    first = decoder.push(ids[0])
    assert first == "" or first.encode() == ours.token_bytes(ids[0])  # only whole characters come out


def test_r1_vectors_from_the_math_notes(real):
    tok = real["deepseek-r1"][0]
    vectors = {
        "Hello world": [19923, 2058], "DeepSeek": [53091, 4374, 1465],
        "1234567 apples": [6895, 18009, 25, 37679], "你好，世界！": [30594, 303, 3427, 1175],
        "<think>\nhi</think>": [128798, 201, 6366, 128799],
        "  leading spaces\n\n\ttab": [223, 6646, 13564, 271, 200, 14278],
        "it's e.g. x+y=12.5%": [279, 734, 312, 3588, 16, 1527, 35576, 31, 736, 16, 23, 7],
        "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜><｜User｜>And 3+3?"
        "<｜Assistant｜><think>\n": [0, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804, 271, 22, 1, 128803, 4195,
                                   223, 21, 13, 21, 33, 128804, 128798, 201],
    }  # fmt: skip
    for text, ids in vectors.items():
        assert tok.encode(text) == ids, text
    assert tok.encode("Hello world", add_bos=tok.add_bos) == [0, 19923, 2058]
    assert (tok.bos_id, tok.eos_id, tok.token_id("<think>"), tok.is_control(128803)) == (0, 1, 128798, True)


def test_joyai_name_and_trimmed_tiny_tokenizer(tmp_path):
    # joyai-llm is what llama.cpp's converter writes for R1 under transformers 5: same splits.
    from r1cpu.tools.make_checkpoint import PRESETS, load_tokenizer

    files = load_tokenizer(PRESETS["tiny-v3"])
    (tmp_path / "tokenizer.json").write_text(files.tokenizer_json, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(files.config_json, encoding="utf-8")
    kv = gguf_kv(tmp_path, tmp_path, 1024)
    kv["tokenizer.ggml.pre"] = "joyai-llm"
    ours, hf = Tokenizer(kv), tokenizers.Tokenizer.from_str(files.tokenizer_json)
    for text in corpus(n_random=100):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"tokenizer.ggml.pre": "gpt-4o"}, "unsupported tokenizer.ggml.pre 'gpt-4o'"),
        ({"tokenizer.ggml.model": "llama"}, "unsupported tokenizer.ggml.model 'llama'"),
        ({"tokenizer.ggml.merges": None}, "GGUF has no tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "tokens but 2 token types"),
    ],
)
def test_bad_metadata_is_a_one_line_error(edit, message):
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-v3", "tokenizer.ggml.tokens": ["a", "b", "c"],
          "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"]}  # fmt: skip
    kv.update(edit)
    kv = {k: v for k, v in kv.items() if v is not None}
    with pytest.raises(TokenizerError, match=message) as e:
        Tokenizer(kv)
    assert "\n" not in str(e.value)
