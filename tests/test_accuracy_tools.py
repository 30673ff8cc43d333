"""r1cpu perplexity / kld / compare: llama-perplexity's chunking and scoring, its KLD statistics,
saved base log-probs, and the three commands end to end on tiny-v3."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import r1cpu
from r1cpu.runtime import kld
from r1cpu.runtime.cli import main as cli
from r1cpu.runtime.convert import convert
from r1cpu.runtime.perplexity import log_softmax, make_chunks, mean_and_error, perplexity, read_text
from r1cpu.runtime.tokenizer import Tokenizer

TEXT_FILE = Path(__file__).parents[1] / "tools" / "data" / "eval-text.txt"
CTX = 64


@pytest.fixture(scope="module")
def files(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    return {t: convert(checkpoints["tiny-v3"], root / f"{t}.gguf", t).path for t in ("f32", "q4_k_m")}


@pytest.fixture(scope="module")
def chunks(files):
    return make_chunks(files["f32"], read_text(TEXT_FILE), CTX, n_chunks=3)


def test_eval_text_gives_many_default_chunks(files):
    assert len(make_chunks(files["f32"], read_text(TEXT_FILE)).tokens) >= 8  # ctx 512 by default


def test_chunks_as_llama_perplexity(files):
    text = read_text(TEXT_FILE)
    tok = Tokenizer.from_gguf(files["f32"])
    ids = tok.encode(text, add_bos=True)
    c = make_chunks(files["f32"], text, CTX)
    assert tok.add_bos and c.tokens.shape == (len(ids) // CTX, CTX)
    assert np.all(c.tokens[:, 0] == tok.bos_id)  # every chunk starts with BOS ...
    assert np.array_equal(c.tokens[:, 1:], np.reshape(ids[: c.tokens.size], (-1, CTX))[:, 1:])  # ... in place
    assert c.first == CTX // 2 and c.targets.shape == (len(c.tokens), CTX - 1 - CTX // 2)
    with pytest.raises(ValueError, match="needs at least"):
        make_chunks(files["f32"], text[:200], CTX)


def test_perplexity_scores_the_second_half(files, chunks):
    model = r1cpu.load(files["f32"])
    nll = []
    for chunk in chunks.tokens:
        lp = log_softmax(model.logits(chunk))
        nll += [-lp[j, chunk[j + 1]] for j in range(CTX // 2, CTX - 1)]
    got = perplexity(model, chunks)
    assert got.nll.size == len(nll) == 3 * 31
    assert got.ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)
    assert got.error == pytest.approx(got.ppl * np.std(nll) / np.sqrt(len(nll) - 1), rel=1e-4)
    assert str(got).startswith("Final estimate: PPL = ")


def test_token_stats_formulas():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 40)) * 3, rng.standard_normal((50, 40)) * 3
    targets = rng.integers(0, 40, 50)
    s = kld.token_stats(log_softmax(a), log_softmax(b), targets)
    p, q = np.exp(log_softmax(a).astype(np.float64)), np.exp(log_softmax(b).astype(np.float64))
    assert np.allclose(s.kld, np.sum(p * np.log(p / q), axis=1), rtol=1e-5, atol=1e-7)
    assert np.allclose(s.p_diff, q[np.arange(50), targets] - p[np.arange(50), targets], atol=1e-7)
    assert np.array_equal(s.same_top, a.argmax(1) == b.argmax(1))
    same = kld.token_stats(log_softmax(a), log_softmax(a), targets)
    assert np.all(same.kld == 0) and same.same_top.all()


def test_mean_and_error_as_llama():
    v = np.arange(20.0)
    assert mean_and_error(v) == pytest.approx((9.5, np.sqrt((np.mean(v**2) - 9.5**2) / 19)))
    assert mean_and_error(v[:10])[1] == 0.0  # llama.cpp reports no error below 11 values


def test_kld_report_and_saved_base(files, chunks, tmp_path):
    base = kld.compute_base(r1cpu.load(files["f32"]), chunks)
    quant = r1cpu.load(files["q4_k_m"])
    res = kld.kl_divergence(quant, base)
    assert 0 < res.kld[0] < 1 and 0 < res.same_top[0] < 1 and res.t.kld.size == chunks.targets.size
    report = str(res)
    for line in ("Mean    KLD:", "99.0%   KLD:", "Median  KLD:", " 1.0%   KLD:", "RMS Δp    :", "Same top p:"):
        assert line in report
    kld.save_base(tmp_path / "base", base)
    again = kld.kl_divergence(quant, kld.load_base(tmp_path / "base"))
    assert np.array_equal(again.t.kld, res.t.kld)
    self_kld = kld.kl_divergence(r1cpu.load(files["f32"]), base)
    assert np.all(self_kld.t.kld == 0) and self_kld.same_top[0] == 1.0


def test_base_file_checks(files, chunks, tmp_path):
    base = kld.compute_base(r1cpu.load(files["f32"]), chunks)
    kld.save_base(tmp_path / "b.npz", base)
    assert kld.is_base_file(tmp_path / "b.npz") and not kld.is_base_file(files["f32"])
    with pytest.raises(ValueError, match="tokenizes differently"):
        kld.check_same_text(base, files["q4_k_m"], read_text(TEXT_FILE)[500:])
    with pytest.raises(ValueError, match="--ctx"):
        kld.prepare_base(tmp_path / "b.npz", None, CTX * 2, None, False)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not a base log-prob file"):
        kld.load_base(tmp_path / "junk.npz")
    short = kld.Base(base.chunks, base.logprobs[..., :-1])
    with pytest.raises(ValueError, match="vocabularies differ"):
        kld.kl_divergence(r1cpu.load(files["q4_k_m"]), short)


def test_cli_perplexity_and_kld(files, tmp_path):
    run = CliRunner().invoke
    args = ["--file", str(TEXT_FILE), "--ctx", str(CTX), "--chunks", "2"]
    res = run(cli, ["perplexity", str(files["q4_k_m"]), *args])
    assert res.exit_code == 0 and "Final estimate: PPL = " in res.output
    base = tmp_path / "base.npz"
    res = run(cli, ["kld", str(files["f32"]), str(files["q4_k_m"]), *args, "--save-base", str(base)])
    assert res.exit_code == 0 and "Mean    KLD:" in res.output and base.exists()
    mean_line = next(line for line in res.output.splitlines() if line.startswith("Mean    KLD"))
    res = run(cli, ["kld", str(base), str(files["q4_k_m"]), "--file", str(TEXT_FILE)])
    assert res.exit_code == 0 and mean_line in res.output
    res = run(cli, ["kld", str(files["f32"]), str(files["q4_k_m"])])
    assert res.exit_code == 1 and "--file is needed" in res.output


def test_cli_compare(checkpoints, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(checkpoints["tiny-v3"]), "--types", "q8_0,q4_k_m", "--file", str(TEXT_FILE),
            "--ctx", str(CTX), "--chunks", "1", "--tg-tokens", "4", "-o", str(out)]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["type", "f32", "q8_0", "q4_k_m"]
    if importlib.util.find_spec("matplotlib"):  # the PNG is an optional extra
        assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("*.gguf")) == [f"tiny-v3.{t}.gguf" for t in ("f32", "q4_k_m", "q8_0")]
    res = CliRunner().invoke(cli, args[:2] + ["--types", "q9_k"] + args[4:])
    assert res.exit_code == 1 and "unknown output type" in res.output
