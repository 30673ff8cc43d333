"""Mixed k-quant recipes (llama-quantize's per-tensor choices for deepseek2), --tensor-type overrides,
and the runtime on every recipe. Opt-in (interop): llama.cpp's own quantizer writes the same types and
bytes from our F32 file, and our runtime runs its files."""

import ctypes
from collections import Counter
from dataclasses import replace

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import r1cpu
from r1cpu.quant.registry import GGMLType
from r1cpu.runtime.cli import main as cli
from r1cpu.runtime.convert import convert
from r1cpu.runtime.recipes import RECIPES, Model, choose, parse_tensor_types, recipe, use_more_bits
from r1cpu.tools import make_checkpoint as mc

MIXES = ["q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"]
LLAMA_FTYPE = {"q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7}
T = GGMLType


def deepseek_tensors(L, D, H, QL, C, N, R, V, E, F, FF, dense=1, vocab=1000, S=1, tied=False):
    """(name, numpy shape) of a deepseek2 MLA-layout GGUF, in the converter's order."""
    out = [("token_embd.weight", (vocab, D))]
    for i in range(L):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (D,)), (b + "attn_q_a_norm.weight", (QL,)),
                (b + "attn_kv_a_norm.weight", (C,)), (b + "attn_q_a.weight", (QL, D)),
                (b + "attn_q_b.weight", (H * (N + R), QL)), (b + "attn_kv_a_mqa.weight", (C + R, D)),
                (b + "attn_k_b.weight", (H, C, N)), (b + "attn_v_b.weight", (H, V, C)),
                (b + "attn_output.weight", (D, H * V)), (b + "ffn_norm.weight", (D,))]  # fmt: skip
        if i < dense:
            out += [(b + "ffn_gate.weight", (FF, D)), (b + "ffn_up.weight", (FF, D)), (b + "ffn_down.weight", (D, FF))]
        else:
            out += [(b + "ffn_gate_inp.weight", (E, D)), (b + "exp_probs_b.bias", (E,)),
                    (b + "ffn_gate_exps.weight", (E, F, D)), (b + "ffn_up_exps.weight", (E, F, D)),
                    (b + "ffn_down_exps.weight", (E, D, F)), (b + "ffn_gate_shexp.weight", (F * S, D)),
                    (b + "ffn_up_shexp.weight", (F * S, D)), (b + "ffn_down_shexp.weight", (D, F * S))]  # fmt: skip
    out.append(("output_norm.weight", (D,)))
    return out if tied else out + [("output.weight", (vocab, D))]


# DeepSeek-V3 / R1 (61 layers, 3 dense) and a 256-divisible 8-layer, 8-expert model (docs §6)
V3 = deepseek_tensors(61, 7168, 128, 1536, 512, 128, 64, 128, 256, 2048, 18432, dense=3, vocab=129280)
EIGHT = deepseek_tensors(8, 256, 4, 256, 256, 32, 16, 64, 8, 256, 512)


def types_of(out_type, tensors, overrides=()):
    return dict(zip([n for n, _ in tensors], choose(recipe(out_type), tensors, parse_tensor_types(overrides))))


def test_model_facts_from_tensor_list():
    assert Model.of(V3) == Model(61, 256, False)
    assert Model.of(EIGHT[:-1]) == Model(8, 8, True)


def test_use_more_bits_on_v3():
    more = [i for i in range(61) if use_more_bits(i, 61)]
    assert more == [*range(7), *range(9, 52, 3), *range(53, 61)]


def test_q4_k_m_on_deepseek_v3():
    got = types_of("q4_k_m", V3)
    assert got["output.weight"] == T.Q6_K and got["token_embd.weight"] == T.Q4_K
    for i in range(61):
        b = f"blk.{i}."
        assert got[b + "attn_k_b.weight"] == T.Q5_0  # 128-element rows: Q4_K falls back
        assert got[b + "attn_norm.weight"] == T.F32
        for name in ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_v_b", "attn_output"):
            assert got[b + name + ".weight"] == T.Q4_K
        downs = [n for n in got if n.startswith(b + "ffn_down")]
        assert downs and all(got[n] == (T.Q6_K if use_more_bits(i, 61) else T.Q4_K) for n in downs)
        if i >= 3:
            assert got[b + "ffn_gate_inp.weight"] == got[b + "exp_probs_b.bias"] == T.F32
            assert got[b + "ffn_up_exps.weight"] == got[b + "ffn_gate_shexp.weight"] == T.Q4_K


@pytest.mark.parametrize("mix, down0, down_mid, attn_out, default", [
    ("q2_k", T.Q3_K, T.Q3_K, T.Q3_K, T.Q2_K),
    ("q3_k_m", T.Q5_K, T.Q4_K, T.Q4_K, T.Q3_K),
    ("q4_k_s", T.Q5_K, T.Q4_K, T.Q4_K, T.Q4_K),
    ("q5_k_m", T.Q6_K, T.Q5_K, T.Q5_K, T.Q5_K),
    ("q6_k", T.Q6_K, T.Q6_K, T.Q6_K, T.Q6_K),
])  # fmt: skip
def test_mixes_on_deepseek_v3(mix, down0, down_mid, attn_out, default):
    got = types_of(mix, V3)
    assert got["output.weight"] == T.Q6_K and got["token_embd.weight"] == default
    assert got["blk.0.ffn_down.weight"] == down0  # the first layers: more bits in every mix
    assert got["blk.31.ffn_down_exps.weight"] == down_mid  # not a use_more_bits layer
    assert got["blk.31.attn_output.weight"] == attn_out and got["blk.31.ffn_up_exps.weight"] == default


def test_eight_experts_rules_and_tied_output():
    got = types_of("q4_k_m", EIGHT[:-1])  # no output.weight: token_embd is the output
    assert got["token_embd.weight"] == T.Q6_K
    assert [got[f"blk.{i}.ffn_down_exps.weight"] for i in range(3, 8)] == [T.Q6_K, T.Q4_K, T.Q4_K, T.Q6_K, T.Q6_K]
    assert all(got[f"blk.{i}.attn_output.weight"] == T.Q5_K for i in range(8))
    assert types_of("q5_k_m", EIGHT)["blk.1.attn_output.weight"] == T.Q5_K


def test_v2_lite_rows_fall_back():
    lite = deepseek_tensors(27, 2048, 16, 1536, 512, 128, 64, 128, 64, 1408, 10944)
    got = types_of("q4_k_m", lite)
    assert got["blk.0.ffn_down.weight"] == T.Q8_0  # Q6_K layer: 10944 % 256 != 0
    assert got["blk.10.ffn_down_exps.weight"] == T.Q5_0 and got["blk.2.ffn_down_exps.weight"] == T.Q8_0
    assert types_of("q5_k_m", lite)["blk.10.ffn_down_exps.weight"] == T.Q5_1
    assert types_of("q2_k", lite)["blk.10.attn_k_b.weight"] == T.Q4_0
    small = deepseek_tensors(2, 64, 2, 32, 32, 16, 16, 16, 4, 32, 160)
    assert types_of("q8_0", small)["blk.0.attn_k_b.weight"] == T.F16  # 16 % 32: nothing fits


def test_tensor_type_overrides():
    got = types_of("q4_k_m", V3, ["ffn_down_exps=q8_0", "ffn_down=q2_k", ".*=q4_0"])
    assert got["blk.3.ffn_down_exps.weight"] == T.Q8_0  # the first matching pattern wins
    assert got["blk.3.ffn_down_shexp.weight"] == T.Q2_K
    assert got["blk.1.attn_q_a.weight"] == T.Q4_0 and got["output.weight"] == T.Q4_0
    assert got["blk.1.attn_k_b.weight"] == T.Q4_0
    assert got["blk.5.attn_norm.weight"] == got["blk.5.ffn_gate_inp.weight"] == T.F32  # never quantized
    assert types_of("q8_0", V3, ["attn_k_b=q6_k"])["blk.0.attn_k_b.weight"] == T.Q8_0  # falls back


@pytest.mark.parametrize("spec", ["ffn_down", "=q4_k", "ffn=q9_k", "ffn=q4_1", "([=q4_k"])
def test_bad_tensor_type_is_one_line_error(spec):
    with pytest.raises(ValueError, match="--tensor-type"):
        parse_tensor_types([spec])


# ---- on converted checkpoints ----------------------------------------------------------------

# Every matrix of this model has rows of a multiple of 256 elements except attn_k_b (qk_nope),
# so the k-quant types themselves are exercised (tiny-v3's 64-wide rows all fall back).
WIDE = replace(mc.TINY_V3, hidden=256, q_lora=256, kv_lora=256, nope=32, rope=16, v=64, dense_ff=512, moe_ff=256)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(checkpoint folder, its F32 GGUF) of the WIDE preset."""
    root = tmp_path_factory.mktemp("wide")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(mc.PRESETS, "wide", WIDE)
        src = mc.make_checkpoint("wide", root / "hf")
    return src, convert(src, root / "f32.gguf", "f32").path


def kld(ref, logits):
    def logp(z):
        z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    lp = logp(ref)
    return float(np.mean(np.sum(np.exp(lp) * (lp - logp(logits)), axis=-1)))


TOKENS = np.random.default_rng(0).integers(0, 1000, 48)
# about twice the KLD measured against F32 (random weights and routing make it large; Q8_0 is 0.004)
MAX_KLD = {"q2_k": 1.0, "q3_k_m": 0.45, "q4_k_s": 0.3, "q4_k_m": 0.3, "q5_k_m": 0.12, "q6_k": 0.06}


@pytest.mark.parametrize("mix", MIXES)
def test_runtime_runs_every_mix(wide, tmp_path, mix):
    src, f32 = wide
    path = convert(src, tmp_path / f"{mix}.gguf", mix).path
    kinds = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    assert kinds[recipe(mix).pick.default.name] > 0  # the mix's own k-quant is used
    ref = r1cpu.load(f32).logits(TOKENS)
    assert 0 < kld(ref, r1cpu.load(path).logits(TOKENS)) < MAX_KLD[mix]


def test_k_mix_straight_from_fp8(checkpoints, tmp_path):
    # FP8 blocks are dequantized and re-quantized to the mix in the same streaming pass
    f32 = r1cpu.load(convert(checkpoints["tiny-v3-fp8"], tmp_path / "f32.gguf", "f32").path).logits(TOKENS[:16])
    path = convert(checkpoints["tiny-v3-fp8"], tmp_path / "q.gguf", "q4_k_m").path
    assert 0 < kld(f32, r1cpu.load(path).logits(TOKENS[:16])) < MAX_KLD["q4_k_m"]


def test_cli_tensor_type(checkpoints, tmp_path):
    out = tmp_path / "o.gguf"
    args = ["convert", str(checkpoints["tiny-v3"]), "-o", str(out), "--type", "q4_k_m",
            "--tensor-type", "attn_output=q8_0", "--tensor-type", "ffn_down_exps=q6_k"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert got["blk.1.attn_output.weight"] == "Q8_0"
    assert got["blk.1.ffn_down_exps.weight"] == "Q8_0"  # Q6_K does not fit 32-element rows
    res = CliRunner().invoke(cli, args[:6] + ["--force", "--tensor-type", "attn_output"])
    assert res.exit_code == 1 and "PATTERN=TYPE" in res.output


def test_recipes_are_all_listed_in_cli():
    assert {"q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"} <= set(RECIPES)


# ---- opt-in: llama.cpp's own quantizer ---------------------------------------------------------


def llama_quantize(src, dst, mix):
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[mix]
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.mark.interop
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("which", ["wide", "tiny-v3"])
def test_same_types_and_bytes_as_llama_quantize(wide, checkpoints, tmp_path, mix, which):
    if which == "wide":
        src, f32 = wide
    else:
        src = checkpoints[which]
        f32 = convert(src, tmp_path / "f32.gguf", "f32").path
    theirs = {t.name: t for t in gguf.GGUFReader(llama_quantize(f32, tmp_path / "llama.gguf", mix)).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(convert(src, tmp_path / "ours.gguf", mix).path).tensors}
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    for name, t in ours.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[name].data)), name


@pytest.mark.interop
@pytest.mark.parametrize("mix", MIXES)
def test_runtime_runs_llama_quantized_files(wide, tmp_path, mix):
    _, f32 = wide
    path = llama_quantize(f32, tmp_path / f"{mix}.gguf", mix)
    ref = r1cpu.load(f32).logits(TOKENS)
    assert 0 < kld(ref, r1cpu.load(path).logits(TOKENS)) < MAX_KLD[mix]
