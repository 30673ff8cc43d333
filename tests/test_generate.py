"""Generation on the tiny model: chunked prefill, stop conditions, context limits, chat turns that
reuse (and roll back) the KV cache, and the `generate` / piped `chat` commands."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import r1cpu
from r1cpu.runtime.chat_session import Conversation, ThinkSplitter
from r1cpu.runtime.chat_template import ChatTemplate
from r1cpu.runtime.cli import main
from r1cpu.runtime.convert import convert
from r1cpu.runtime.generate import ContextFullError, StopMatcher, generate, prefill
from r1cpu.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gguf(checkpoints, tmp_path_factory):
    return convert(checkpoints["tiny-v3"], tmp_path_factory.mktemp("gen") / "tiny-v3.gguf", "f32").path


@pytest.fixture(scope="module")
def tiny(gguf):
    model = r1cpu.load(gguf)
    return model, Tokenizer(model.gguf.kv), ChatTemplate.from_kv(model.gguf.kv)


def greedy(log=None):
    def sample(logits, context):
        if log is not None:
            log.append(logits.copy())
        return int(np.argmax(logits))

    return sample


def scripted(ids):
    """A 'sampler' that ignores the logits and replays ids (to force texts, stops and EOS)."""
    it = iter(ids)
    return lambda logits, context: next(it)


def test_stop_matcher_across_pieces():
    m = StopMatcher(["STOP", "\n\n"])
    assert m.feed("abc ST") == ("abc ", False)  # "ST" may start STOP: held back
    assert m.feed("ILL") == ("STILL", False)
    assert m.feed("x\n") == ("x", False)
    assert m.feed("\nrest") == ("", True)


def test_think_splitter_with_split_tags():
    s = ThinkSplitter(thinking=True)
    pieces = s.feed("reason</th") + s.feed("ink>\n\nanswer <thi") + s.feed("nk>again") + s.flush()
    assert [(p.kind, p.text) for p in pieces] == [("think", "reason"), ("answer", "\n\nanswer "), ("think", "again")]


def test_chunked_prefill_equals_one_call(tiny):
    model, tok, _ = tiny
    ids = tok.encode("Some prompt that is a little longer than a chunk of three tokens.", add_bos=True)
    one = model.session().prefill(ids, last_only=True)
    chunked = prefill(model.session(), ids, chunk=3)
    assert np.allclose(one, chunked, atol=1e-4)


def test_greedy_generation_matches_a_manual_loop(tiny):
    model, tok, _ = tiny
    prompt = tok.encode("Hello", add_bos=True)
    pieces = list(generate(model.session(), tok, prompt, greedy(), max_tokens=6, eos_ids=[]))
    tokens = [p.token for p in pieces if p.token is not None]
    s = model.session()
    logits, manual = s.prefill(prompt, last_only=True), []
    for _ in range(6):
        manual.append(int(np.argmax(logits)))
        logits = s.decode(manual[-1])
    assert tokens == manual and pieces[-1].token is None
    stats = pieces[-1].stats
    assert (stats.stop_reason, stats.n_prompt, stats.n_gen) == ("length", len(prompt), 6)
    assert stats.prompt_tps > 0 and stats.gen_tps > 0
    raw = b"".join(tok.token_bytes(t) for t in tokens if not tok.is_control(t))
    assert "".join(p.text for p in pieces) == raw.decode("utf-8", errors="replace")


def test_stops_on_eos_and_on_stop_strings(tiny):
    model, tok, _ = tiny
    words = tok.encode("one two three")
    pieces = list(generate(model.session(), tok, [0], scripted(words + [tok.eos_id]), max_tokens=50))
    assert "".join(p.text for p in pieces) == "one two three" and pieces[-1].stats.stop_reason == "eos"
    pieces = list(generate(model.session(), tok, [0], scripted(words), max_tokens=50, stop=["two"]))
    assert "".join(p.text for p in pieces) == "one " and pieces[-1].stats.stop_reason == "stop"


def test_context_limits_are_errors_or_stop_reasons(tiny):
    model, tok, _ = tiny
    with pytest.raises(ContextFullError, match="prompt of 12 tokens does not fit: 0 of 8 context tokens"):
        list(generate(model.session(8), tok, [0] * 12, greedy(), max_tokens=4))
    pieces = list(generate(model.session(8), tok, [0] * 5, greedy(), max_tokens=100, eos_ids=[]))
    assert pieces[-1].stats.stop_reason == "context" and pieces[-1].stats.n_gen == 4  # 5 + 3 decoded = 8


def _turn(conv, text, n, log=None):
    list(conv.ask(text, greedy(log), n))
    assert len(conv.cached) == conv.session.n_past  # what we think is cached is what is cached
    return conv.last_stats


def _fresh_first_logits(tiny, messages, text):
    model, tok, template = tiny
    conv, log = Conversation(model, tok, template), []
    conv.messages = [dict(m) for m in messages]
    _turn(conv, text, 1, log)
    return log[0], conv.last_stats


def test_second_turn_reuses_and_rolls_back_the_cache(tiny):
    model, tok, template = tiny
    conv = Conversation(model, tok, template)
    _turn(conv, "First question?", 5)
    before = list(conv.messages)
    log = []
    stats = _turn(conv, "Second?", 2, log)
    fresh, fresh_stats = _fresh_first_logits(tiny, before, "Second?")
    # R1's template drops the reasoning of turn 1, so the prompt branches inside the cached reply.
    assert 0 < stats.n_prompt < fresh_stats.n_prompt
    assert np.allclose(log[0], fresh, atol=1e-4)


def test_interrupted_turn_keeps_a_consistent_conversation(tiny):
    model, tok, template = tiny
    conv = Conversation(model, tok, template)
    calls = []

    def interrupt_third(logits, context):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return int(np.argmax(logits))

    with pytest.raises(KeyboardInterrupt):
        list(conv.ask("Tell me a long story.", interrupt_third, 50))
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert len(conv.cached) == conv.session.n_past
    before, log = list(conv.messages), []
    _turn(conv, "Shorter, please.", 1, log)
    fresh, _ = _fresh_first_logits(tiny, before, "Shorter, please.")
    assert np.allclose(log[0], fresh, atol=1e-4)


def test_full_context_error_or_oldest_turns_dropped(tiny):
    model, tok, template = tiny
    conv = Conversation(model, tok, template, n_ctx=64)
    long_text = "word " * 20
    _turn(conv, long_text, 2)
    with pytest.raises(ContextFullError, match="needs .* tokens but the context holds 64"):
        _turn(conv, long_text, 2)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]  # the refused turn is not kept
    conv.drop_oldest = True
    _turn(conv, long_text, 2)
    assert conv.dropped == 1 and [m["role"] for m in conv.messages] == ["user", "assistant"]


def test_save_load_reset(tiny, tmp_path):
    model, tok, template = tiny
    conv = Conversation(model, tok, template)
    conv.set_system("Be brief.")
    _turn(conv, "Hi", 2)
    conv.save(tmp_path / "c.json")
    other = Conversation(model, tok, template)
    other.load(tmp_path / "c.json")
    assert other.messages == conv.messages
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "Be brief."}]
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "user"}]}')
    with pytest.raises(ValueError, match="every message needs a role and a content"):
        other.load(tmp_path / "bad.json")


def test_generate_command_json_is_reproducible(gguf):
    args = ["generate", str(gguf), "-p", "Hello", "--chat", "-n", "5", "--seed", "3", "--json"]
    runs = [CliRunner().invoke(main, args) for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    speeds = ("prompt_tok_per_s", "gen_tok_per_s")
    out = [{k: v for k, v in json.loads(r.stdout).items() if k not in speeds} for r in runs]
    assert out[0] == out[1] and out[0]["text"]
    assert out[0]["gen_tokens"] == 5 and out[0]["prompt_tokens"] >= 6 and out[0]["stop_reason"] == "length"
    assert "tok/s" in runs[0].stderr and "tok/s" not in runs[0].stdout


def test_generate_command_streams_text_and_rejects_bad_options(gguf):
    r = CliRunner().invoke(main, ["generate", str(gguf), "-p", "Hi", "-n", "3", "--temp", "0"])
    assert r.exit_code == 0 and r.stdout.endswith("\n") and "generated: 3 tokens" in r.stderr
    r = CliRunner().invoke(main, ["generate", str(gguf), "-p", "Hi", "--top-p", "2"])
    assert r.exit_code == 1 and "Error: top-p must be in (0, 1]" in r.stderr


def test_piped_chat_answers_each_line(gguf):
    r = CliRunner().invoke(main, ["chat", str(gguf), "-n", "3", "--seed", "1"], input="Hi there\n/stats\nAgain\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("| rss ") == 3  # two status lines and the /stats report
    assert ">>> Hi there" in r.stdout and ">>> Again" in r.stdout and "1 turns, 2 messages" in r.stdout


def test_chat_without_model_uses_the_embedded_tiny_r1_and_demo_answers(monkeypatch, capsys):
    from r1cpu.runtime import chat_cli
    from r1cpu.tools import demo

    opened = []
    real_open = chat_cli._open
    monkeypatch.setattr(chat_cli, "_open", lambda path, *a: opened.append(path) or real_open(path, *a))
    r = CliRunner().invoke(main, ["chat", "-n", "2"], input="Hi\n")
    assert r.exit_code == 0, r.output
    assert opened == [chat_cli.DEFAULT_MODEL] and "| rss " in r.stdout
    demo.main()  # stdin is not a terminal under pytest: one held-out question through the chat loop
    out = capsys.readouterr().out
    assert "tokenizer: gpt2/deepseek-v3, chat template yes" in out and f">>> {demo.QUESTION}" in out
    a, b = map(int, demo.QUESTION.removeprefix("What is ").removesuffix("?").split(" * "))
    assert f"so far {a * b}\n{a * b}\n" in out  # its reasoning reached the result, then the answer


def test_generate_command_context_overflow_is_one_line(gguf):
    r = CliRunner().invoke(main, ["generate", str(gguf), "-p", "word " * 30, "--ctx", "16"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: prompt of") and r.stderr.count("\n") == 1
