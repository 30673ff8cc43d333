"""Chat prompts rendered from GGUF metadata are byte-identical to transformers' apply_chat_template
(committed fixture from tools/make_template_fixtures.py; a `reference` test re-renders live)."""

import json
from pathlib import Path

import pytest

from r1cpu.runtime.chat_template import R1_TEMPLATE, ChatTemplate, TemplateError
from r1cpu.runtime.convert_meta import write_tokenizer
from r1cpu.runtime.gguf_writer import GGUFWriter
from r1cpu.runtime.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "chat_templates" / "expected.json").read_text(encoding="utf-8"))
N_VOCAB = {"deepseek-r1": 129280, "deepseek-v2": 102400}
CASES = [(name, i) for name, cases in EXPECTED["templates"].items() for i in range(len(cases))]


def _case_id(case):
    name, i = case
    c = EXPECTED["templates"][name][i]
    return f"{name}-{c['name']}-{'gen' if c['add_generation_prompt'] else 'nogen'}"


@pytest.fixture(scope="module")
def metadata():
    """name -> the tokenizer.* metadata the converter writes (taken from the writer, no file needed)."""
    out = {}
    for name, n_vocab in N_VOCAB.items():
        w = GGUFWriter()
        write_tokenizer(w, FIXTURES / "tokenizers" / name, n_vocab, {})
        out[name] = {key: value for key, (_, value, _) in w.kv.items()}
    return out


@pytest.fixture(scope="module")
def tokenizer_of(metadata):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Tokenizer(metadata[name])
        return cache[name]

    return get


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_prompt_text_and_ids_match_transformers(case, metadata, tokenizer_of):
    name, i = case
    c = EXPECTED["templates"][name][i]
    text = ChatTemplate.from_kv(metadata[name]).render(c["messages"], add_generation_prompt=c["add_generation_prompt"])
    assert text == c["text"]
    assert tokenizer_of(name).encode(text) == c["ids"]  # the template's own BOS, not a second one


def test_r1_prompt_from_the_math_notes(metadata):
    case = next(c for c in EXPECTED["templates"]["deepseek-r1"] if c["name"] == "math_notes_example")
    assert case["add_generation_prompt"] and case["ids"] == [
        0, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804, 271, 22, 1, 128803, 4195, 223, 21, 13, 21, 33, 128804,
        128798, 201,
    ]  # fmt: skip
    assert case["text"].endswith("<｜Assistant｜><think>\n") and "simple" not in case["text"]


def test_builtin_r1_template_is_the_published_one_and_the_fallback(metadata):
    config = json.loads((FIXTURES / "tokenizers" / "deepseek-r1" / "tokenizer_config.json").read_text())
    assert R1_TEMPLATE == config["chat_template"]
    kv = {k: v for k, v in metadata["deepseek-v2"].items() if k != "tokenizer.chat_template"}
    tpl = ChatTemplate.from_kv(kv)
    assert tpl.source == R1_TEMPLATE
    assert tpl.render([{"role": "user", "content": "x"}]) == "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜><think>\n"


def test_template_errors_are_one_line():
    tpl = ChatTemplate("{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}ok", {})
    assert tpl.render([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(TemplateError, match="chat template: only one message"):
        tpl.render([{"role": "user", "content": "a"}] * 2)
    with pytest.raises(TemplateError, match="does not parse") as e:
        ChatTemplate("{% if %}", {})
    assert "\n" not in str(e.value)


def test_transformers_environment_details():
    # trim_blocks/lstrip_blocks, tojson without HTML escaping, loop controls, {% generation %} blocks
    source = "  {% for m in messages %}\n{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}\n" \
             "{% generation %}{{ bos_token }}{% endgeneration %}"  # fmt: skip
    out = ChatTemplate(source, {"bos_token": "<s>"}).render([{"role": "user", "content": "<&>"}, {"role": "x"}])
    assert out == '{"role": "user", "content": "<&>"}<s>'


@pytest.mark.reference
def test_live_transformers_render():
    transformers = pytest.importorskip("transformers")
    for name, cases in EXPECTED["templates"].items():
        hf = transformers.AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / name)
        for c in cases:
            gen = c["add_generation_prompt"]
            text = hf.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=gen)
            assert text == c["text"], (name, c["name"])
