"""End to end on the tiny presets: converted GGUF vs the committed transformers float32 logits,
prefill + decode vs one batch, the expert byte counter, layouts, and one-line load errors."""

from pathlib import Path

import numpy as np
import pytest

from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor
from r1cpu.runtime.config import ConfigError
from r1cpu.runtime.convert import convert
from r1cpu.runtime.gguf_reader import ARRAY, STRING, GGUFError, GGUFFile
from r1cpu.runtime.gguf_writer import BOOL, FLOAT32, INT32, UINT32, GGUFWriter
from r1cpu.runtime.model import load

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
PRESETS = ["tiny-v3", "tiny-v3-fp8", "tiny-v2", "tiny-moonlight"]
# out_type: (max mean KL, min top-1 agreement) -- loose sanity bounds. The tiny models route
# 2 of 8 experts; Q8_0/Q4_0 noise flips some routing decisions, and those positions dominate
# the KL (tiny-v3 q8_0: 5 of 64 positions flipped carry most of it).
QUANT_BOUNDS = {
    "f16": (1e-3, 0.95),
    "bf16": (5e-3, 0.9),
    "q8_0": (0.03, 0.85),
    "q4_0": (0.3, 0.3),
}


@pytest.fixture(scope="session")
def build(checkpoints, tmp_path_factory):
    """build(preset, out_type) -> path of the converted GGUF, made once per session."""
    root = tmp_path_factory.mktemp("gguf")
    done = {}

    def get(preset: str, out_type: str = "f32") -> Path:
        if (preset, out_type) not in done:
            out = root / f"{preset}.{out_type}.gguf"
            convert(checkpoints[preset], out, out_type)
            done[preset, out_type] = out
        return done[preset, out_type]

    return get


def _reference(preset: str):
    path = REFERENCE / f"{preset}.npz"
    if not path.exists():
        pytest.skip(f"no reference fixture {path.name}")
    ref = np.load(path)
    return ref["tokens"].astype(np.int64), ref["logits"]


@pytest.mark.parametrize("preset", PRESETS)
def test_f32_logits_match_transformers(build, preset):
    tokens, ref = _reference(preset)
    model = load(build(preset))
    logits = model.logits(tokens)
    assert logits.shape == ref.shape and logits.dtype == np.float32
    delta = np.abs(logits - ref).max()
    top1 = (logits.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{preset} f32: max |dlogit| {delta:.3g}, top-1 {top1:.0%}")
    assert delta <= 1e-3
    assert top1 == 1.0


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_then_decode_equals_full(build, preset):
    tokens, _ = _reference(preset)
    model = load(build(preset))
    full = model.logits(tokens)
    half = len(tokens) // 2  # the decoded positions run past the YaRN original context (32)
    session = model.session()
    rows = [session.prefill(tokens[:half])] + [session.decode(int(t))[None] for t in tokens[half:]]
    assert session.n_past == len(tokens)
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-4)
    last = model.session().prefill(tokens, last_only=True)
    np.testing.assert_allclose(last, full[-1], rtol=0, atol=1e-4)


def test_expert_bytes_read_equal_routing(build):
    model = load(build("tiny-v3"))
    cfg, stats = model.config, model.expert_stats
    tokens, _ = _reference("tiny-v3")
    session = model.session()

    def implied(layer):
        w = model.weights.layers[layer].ffn
        return np.array([w.expert_nbytes(e) if e in stats.last_idx[layer] else 0 for e in range(cfg.n_expert)])

    stats.reset()
    session.prefill(tokens[:20])  # a batch reads each selected expert once
    moe_layers = [i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)]
    assert moe_layers
    for i in moe_layers:
        assert stats.last_idx[i].shape == (20, cfg.n_expert_used)
        assert (stats.bytes_read[i] == implied(i)).all()
        assert stats.tokens[i].sum() == 20 * cfg.n_expert_used
    for t in tokens[20:24]:
        before = stats.bytes_read.copy()
        session.decode(int(t))
        for i in moe_layers:
            assert (stats.bytes_read[i] - before[i] == implied(i)).all()
            assert np.count_nonzero(stats.bytes_read[i] - before[i]) == cfg.n_expert_used
    assert not stats.bytes_read[[i for i in range(cfg.n_layer) if i not in moe_layers]].any()


def _mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("out_type", list(QUANT_BOUNDS))
@pytest.mark.parametrize("preset", PRESETS)
def test_quantized_types_stay_close(build, preset, out_type):
    tokens, ref = _reference(preset)
    logits = load(build(preset, out_type)).logits(tokens)
    kl, top1 = _mean_kl(ref, logits), (logits.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{preset} {out_type}: mean KL {kl:.3g}, top-1 {top1:.0%}")
    max_kl, min_top1 = QUANT_BOUNDS[out_type]
    assert kl <= max_kl and top1 >= min_top1


# --- rewritten files: other layouts and broken ones -------------------------------------------


def _typed(value):
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return UINT32 if value >= 0 else INT32
    if isinstance(value, float):
        return FLOAT32
    if isinstance(value, str):
        return STRING
    return ARRAY


def rewrite(src: Path, dst: Path, drop=(), tensors=None, kv=None, drop_kv=()) -> Path:
    """Copy a GGUF, dropping tensors/keys and replacing or adding tensors (name -> Tensor)."""
    g = GGUFFile(src)
    w = GGUFWriter(g.alignment)
    for key, value in {**g.kv, **(kv or {})}.items():
        if key in drop_kv or key == "general.alignment":
            continue
        vtype = _typed(value)
        if vtype != ARRAY:
            w.add(key, value, vtype)
        elif len(value) and isinstance(value[0], str):
            w.add_array(key, list(value), STRING)
        else:
            arr = np.asarray(value)
            w.add_array(key, arr, {np.dtype(np.int32): INT32, np.dtype(np.float32): FLOAT32}.get(arr.dtype, UINT32))
    out = {n: t for n, t in g.tensors.items() if n not in drop}
    out.update(tensors or {})
    for name, t in out.items():
        w.add_tensor_info(name, t.shape, t.qtype)
    with open(dst, "wb") as f:
        w.write_header(f)
        for t in out.values():
            w.write_data(f, t.data)
    w.finish()
    return dst


def f32(name, a):
    a = np.ascontiguousarray(a, dtype=np.float32)
    return Tensor(name, GGMLType.F32, a.shape, a)


def test_legacy_kv_b_layout_matches_split(build, tmp_path):
    src = build("tiny-v3")
    g = GGUFFile(src)
    cfg = load(src).config
    H, N, V, C = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    legacy = {}
    for i in range(cfg.n_layer):
        k_b = np.asarray(g.tensor(f"blk.{i}.attn_k_b.weight").data)  # (H, C, N)
        v_b = np.asarray(g.tensor(f"blk.{i}.attn_v_b.weight").data)  # (H, V, C)
        kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(H * (N + V), C)
        legacy[f"blk.{i}.attn_kv_b.weight"] = f32(f"blk.{i}.attn_kv_b.weight", kv_b)
    drop = [n for n in g.tensors if n.endswith(("attn_k_b.weight", "attn_v_b.weight"))]
    arch = "deepseek2."
    kv = {arch + "attention.key_length": N + cfg.qk_rope_head_dim, arch + "attention.value_length": V,
          arch + "attention.head_count_kv": H}  # fmt: skip
    drop_kv = (arch + "attention.key_length_mla", arch + "attention.value_length_mla")
    path = rewrite(src, tmp_path / "legacy.gguf", drop=drop, tensors=legacy, kv=kv, drop_kv=drop_kv)
    model = load(path)
    assert model.weights.mla_layout == "legacy" and model.prefill_form == "naive"
    tokens, _ = _reference("tiny-v3")
    np.testing.assert_allclose(model.logits(tokens), load(src).logits(tokens), rtol=0, atol=1e-4)
    session = model.session()
    rows = [session.prefill(tokens[:40])] + [session.decode(int(t))[None] for t in tokens[40:]]
    np.testing.assert_allclose(np.concatenate(rows), model.logits(tokens), rtol=0, atol=1e-4)


def test_missing_output_is_tied_to_token_embd(build, tmp_path):
    path = rewrite(build("tiny-moonlight"), tmp_path / "tied.gguf", drop=["output.weight"])
    model = load(path)
    assert model.weights.output is model.weights.token_embd
    assert model.logits([1, 2, 3]).shape == (3, model.config.n_vocab)


def _one_line_error(path, exc_type, *needles):
    with pytest.raises(exc_type) as info:
        load(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert str(path) in msg
    for needle in needles:
        assert needle in msg
    return msg


def test_missing_tensor_error(build, tmp_path):
    name = "blk.1.ffn_up_exps.weight"
    path = rewrite(build("tiny-v3"), tmp_path / "missing.gguf", drop=[name])
    _one_line_error(path, GGUFError, name, "missing")


def test_misshaped_tensor_error(build, tmp_path):
    name = "blk.0.attn_kv_a_mqa.weight"
    src = build("tiny-v3")
    good = GGUFFile(src).tensor(name)
    bad = f32(name, np.zeros((good.shape[0] - 1, good.shape[1])))
    path = rewrite(src, tmp_path / "shape.gguf", tensors={name: bad})
    _one_line_error(path, GGUFError, name, "shape")


def test_wrong_architecture_error(build, tmp_path):
    path = rewrite(build("tiny-v3"), tmp_path / "llama.gguf", kv={"general.architecture": "llama"})
    _one_line_error(path, ConfigError, "llama", "deepseek2")
