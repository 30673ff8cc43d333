"""Deterministic random DeepSeek checkpoints in the Hugging Face layout.

    python tools/make_checkpoint.py PRESET OUT_DIR [--layers N] [--seed S]

Writes config.json, tokenizer.json, tokenizer_config.json and `model.safetensors` (or sharded
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`), with per-expert tensor names
as in the real releases. Every tensor is drawn from its own generator seeded by (seed, tensor name),
and written chunk by chunk, so the output is byte-identical for a seed and memory stays bounded
(the 7 GB `bench` preset peaks well under 1 GB of RSS).

Initialisation keeps activations O(1): embeddings ~N(0,1), linear weights ~N(0,1/fan_in) (so the
router logits have std ~1 and lm_head gives logits with std ~1), norm weights ~1+N(0,0.1^2).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from r1cpu.tools.safetensors_io import (
    F8_MAX,
    TensorSpec,
    bf16_to_f32,
    f32_to_bf16,
    f32_to_f8_e4m3,
    write_safetensors,
)
from r1cpu.tools.trim_tokenizer import dumps, trim_tokenizer

TOKENIZERS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers"
CHUNK_ELEMS = 1 << 24  # float32 elements generated at once (64 MiB) bounds peak memory
FP8_BLOCK = 128
FP8_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}


def _yarn(mscale: float) -> dict:
    # original_max_position_embeddings 32: a 64-token test sequence runs past the original context.
    return {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


@dataclass(frozen=True)
class Preset:
    arch: str  # "v3" (DeepseekV3ForCausalLM) or "v2" (DeepseekV2ForCausalLM)
    tokenizer: str  # folder under tests/fixtures/tokenizers
    vocab_keep: int | None  # keep this many BPE entries (tools/trim_tokenizer.py); None: all
    vocab_size: int | None  # config vocab_size; None: tokenizer size padded to a multiple of 32
    # mla
    hidden: int
    heads: int
    q_lora: int | None
    kv_lora: int
    nope: int
    rope: int
    v: int
    # layers and ffn
    layers: int
    first_dense: int
    dense_ff: int
    moe_ff: int
    # moe routing
    experts: int
    top_k: int
    shared: int
    n_group: int
    topk_group: int
    scoring: str
    topk_method: str
    norm_topk: bool
    routed_scale: float
    # rope and norms
    rope_theta: float
    rope_scaling: dict | None
    max_pos: int
    eps: float
    mtp: int = 0  # num_nextn_predict_layers; the MTP layer is stored as layer index `layers`
    fp8: bool = False
    layers_per_shard: int | None = None  # None: a single model.safetensors


TINY_V3 = Preset(
    arch="v3", tokenizer="deepseek-r1", vocab_keep=1000, vocab_size=None,
    hidden=64, heads=4, q_lora=32, kv_lora=32, nope=16, rope=16, v=16,
    # dense_ff 160 > 128 gives the FP8 preset partial 128x128 edge blocks along rows and columns.
    layers=3, first_dense=1, dense_ff=160, moe_ff=32,
    experts=8, top_k=2, shared=1, n_group=2, topk_group=1,
    scoring="sigmoid", topk_method="noaux_tc", norm_topk=True, routed_scale=2.5,
    rope_theta=10000.0, rope_scaling=_yarn(1.0), max_pos=32 * 40, eps=1e-6,
    mtp=1, layers_per_shard=2,
)  # fmt: skip

PRESETS = {
    "tiny-v3": TINY_V3,
    "tiny-v3-fp8": replace(TINY_V3, fp8=True),
    "tiny-v2": replace(
        TINY_V3, arch="v2", tokenizer="deepseek-v2", q_lora=None, shared=2, n_group=1,
        topk_group=1, scoring="softmax", topk_method="greedy", norm_topk=False,
        routed_scale=1.0, rope_scaling=_yarn(0.707), mtp=0,
    ),
    "tiny-moonlight": replace(
        TINY_V3, q_lora=None, shared=2, n_group=1, topk_group=1, routed_scale=2.446,
        rope_theta=50000.0, rope_scaling=None, max_pos=8192, eps=1e-5, mtp=0,
        layers_per_shard=None,
    ),
    "bench": replace(
        TINY_V3, vocab_keep=None, vocab_size=129280,
        hidden=2048, heads=16, q_lora=768, kv_lora=512, nope=128, rope=64, v=128,
        layers=6, first_dense=1, dense_ff=11264, moe_ff=1408,
        experts=64, top_k=6, shared=2, n_group=1, topk_group=1, routed_scale=2.446,
        rope_theta=50000.0, rope_scaling=None, max_pos=8192, eps=1e-5, mtp=0,
        layers_per_shard=1,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer_json: str
    config_json: str
    bos_id: int
    eos_id: int
    size: int  # number of token ids the tokenizer can produce


def load_tokenizer(p: Preset) -> TokenizerFiles:
    return _tokenizer_files(p.tokenizer, p.vocab_keep)


@functools.lru_cache(maxsize=4)  # parsing the 8 MB tokenizer.json dominates a tiny checkpoint
def _tokenizer_files(name: str, vocab_keep: int | None) -> TokenizerFiles:
    folder = TOKENIZERS / name
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = json.loads(text)
    if vocab_keep is not None:
        tok = trim_tokenizer(tok, vocab_keep)
        text = dumps(tok)
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    size = 1 + max(max(tok["model"]["vocab"].values()), *ids.values())
    # tokenizer_config names BOS/EOS by content, so trimming leaves the file itself unchanged.
    bos, eos = (ids[tok_config[k]["content"]] for k in ("bos_token", "eos_token"))
    config_text = (folder / "tokenizer_config.json").read_text(encoding="utf-8")
    return TokenizerFiles(text, config_text, bos, eos, size)


def vocab_size(p: Preset, tok: TokenizerFiles) -> int:
    # Real releases pad the embedding past the tokenizer (V3: 128815 ids, 129280 rows).
    return p.vocab_size or -(-tok.size // 32) * 32


def config_dict(p: Preset, layers: int, tok: TokenizerFiles) -> dict:
    """config.json with every field of the real V3/R1 and V2-Lite files."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM" if p.arch == "v3" else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if p.arch == "v3" else "deepseek_v2",
        "vocab_size": vocab_size(p, tok),
        "hidden_size": p.hidden,
        "intermediate_size": p.dense_ff,
        "moe_intermediate_size": p.moe_ff,
        "num_hidden_layers": layers,
        "first_k_dense_replace": p.first_dense,
        "moe_layer_freq": 1,
        "n_routed_experts": p.experts,
        "num_experts_per_tok": p.top_k,
        "n_shared_experts": p.shared,
        "n_group": p.n_group,
        "topk_group": p.topk_group,
        "routed_scaling_factor": p.routed_scale,
        "norm_topk_prob": p.norm_topk,
        "scoring_func": p.scoring,
        "topk_method": p.topk_method,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.heads,
        "q_lora_rank": p.q_lora,
        "kv_lora_rank": p.kv_lora,
        "qk_nope_head_dim": p.nope,
        "qk_rope_head_dim": p.rope,
        "v_head_dim": p.v,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_pos,
        "rope_theta": p.rope_theta,
        "rope_scaling": p.rope_scaling,
        "rms_norm_eps": p.eps,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
    }
    if p.arch == "v3":
        cfg["num_nextn_predict_layers"] = p.mtp
    if p.fp8:
        cfg["quantization_config"] = FP8_CONFIG
    cfg["torch_dtype"] = "bfloat16"
    return cfg


@dataclass(frozen=True)
class Weight:
    name: str
    shape: tuple[int, ...]
    init: str  # "embed" | "linear" | "norm" | "bias"
    fp8: bool = False  # an nn.Linear of attention/FFN: stored as F8_E4M3 in an FP8 checkpoint
    seed_name: str = ""  # MTP copies of embed/lm_head reuse the main tensor's values

    @property
    def values_name(self) -> str:
        return self.seed_name or self.name


def _linear(name: str, out: int, inp: int, fp8: bool = True) -> Weight:
    return Weight(name + ".weight", (out, inp), "linear", fp8)


def _norm(name: str, dim: int) -> Weight:
    return Weight(name + ".weight", (dim,), "norm")


def _attention(p: Preset, pre: str) -> list[Weight]:
    a = pre + "self_attn."
    q_rows = p.heads * (p.nope + p.rope)
    if p.q_lora:
        q = [
            _linear(a + "q_a_proj", p.q_lora, p.hidden),
            _norm(a + "q_a_layernorm", p.q_lora),
            _linear(a + "q_b_proj", q_rows, p.q_lora),
        ]
    else:
        q = [_linear(a + "q_proj", q_rows, p.hidden)]
    return q + [
        _linear(a + "kv_a_proj_with_mqa", p.kv_lora + p.rope, p.hidden),
        _norm(a + "kv_a_layernorm", p.kv_lora),
        _linear(a + "kv_b_proj", p.heads * (p.nope + p.v), p.kv_lora),
        _linear(a + "o_proj", p.hidden, p.heads * p.v),
    ]


def _mlp(pre: str, ff: int, hidden: int) -> list[Weight]:
    return [
        _linear(pre + "gate_proj", ff, hidden),
        _linear(pre + "up_proj", ff, hidden),
        _linear(pre + "down_proj", hidden, ff),
    ]


def _moe(p: Preset, pre: str) -> list[Weight]:
    m = pre + "mlp."
    router = [_linear(m + "gate", p.experts, p.hidden, fp8=False)]
    if p.topk_method == "noaux_tc":
        router.append(Weight(m + "gate.e_score_correction_bias", (p.experts,), "bias"))
    experts = [w for e in range(p.experts) for w in _mlp(f"{m}experts.{e}.", p.moe_ff, p.hidden)]
    return router + experts + _mlp(m + "shared_experts.", p.moe_ff * p.shared, p.hidden)


def _layer(p: Preset, index: int, dense: bool) -> list[Weight]:
    pre = f"model.layers.{index}."
    ffn = _mlp(pre + "mlp.", p.dense_ff, p.hidden) if dense else _moe(p, pre)
    return [
        _norm(pre + "input_layernorm", p.hidden),
        *_attention(p, pre),
        _norm(pre + "post_attention_layernorm", p.hidden),
        *ffn,
    ]


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _mtp_layer(p: Preset, index: int, vocab: int) -> list[Weight]:
    """The MTP module as released: a full MoE decoder layer, its own norms, eh_proj and copies."""
    pre = f"model.layers.{index}."
    head = _linear(pre + "shared_head.head", vocab, p.hidden, fp8=False)
    return [
        Weight(pre + "embed_tokens.weight", (vocab, p.hidden), "embed", seed_name=EMBED),
        _norm(pre + "enorm", p.hidden),
        _norm(pre + "hnorm", p.hidden),
        _linear(pre + "eh_proj", p.hidden, 2 * p.hidden, fp8=False),
        *_layer(p, index, dense=False),
        _norm(pre + "shared_head.norm", p.hidden),
        replace(head, seed_name=HEAD),
    ]


def shard_weights(p: Preset, layers: int, vocab: int) -> list[list[Weight]]:
    """Weights grouped by output file: embeddings first, final norm and lm_head last."""
    blocks = [_layer(p, i, dense=i < p.first_dense) for i in range(layers)]
    blocks += [_mtp_layer(p, layers + i, vocab) for i in range(p.mtp)]
    blocks[0].insert(0, Weight(EMBED, (vocab, p.hidden), "embed"))
    blocks[-1] += [_norm("model.norm", p.hidden), _linear("lm_head", vocab, p.hidden, fp8=False)]
    per = p.layers_per_shard or len(blocks)
    return [sum(blocks[i : i + per], []) for i in range(0, len(blocks), per)]


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _f32_chunks(w: Weight, seed: int) -> Iterator[np.ndarray]:
    """Float32 values of `w` as [rows, cols] blocks of whole 128-row FP8 bands."""
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    step = max(FP8_BLOCK, CHUNK_ELEMS // cols // FP8_BLOCK * FP8_BLOCK)
    rng = _rng(seed, w.values_name)
    for r0 in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r0), cols), dtype=np.float32)
        if w.init == "linear":
            x *= np.float32(1.0 / math.sqrt(cols))
        elif w.init == "norm":
            x = np.float32(1.0) + np.float32(0.1) * x
        elif w.init == "bias":
            x *= np.float32(0.1)
        yield x


def fp8_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 128x128 block (edge blocks partial): scale_inv = amax/448, bits = e4m3(x / scale_inv)."""
    rows, cols = x.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = np.zeros((br * FP8_BLOCK, bc * FP8_BLOCK), np.float32)
    padded[:rows, :cols] = np.abs(x)
    amax = padded.reshape(br, FP8_BLOCK, bc, FP8_BLOCK).max(axis=(1, 3))
    scale_inv = (np.maximum(amax, np.float32(1e-12)) / np.float32(F8_MAX)).astype(np.float32)
    full = np.repeat(np.repeat(scale_inv, FP8_BLOCK, 0), FP8_BLOCK, 1)[:rows, :cols]
    return f32_to_f8_e4m3(x / full), scale_inv


def tensor_specs(w: Weight, seed: int, fp8: bool) -> list[TensorSpec]:
    if w.init == "bias":  # e_score_correction_bias is float32 in the releases
        return [TensorSpec(w.name, w.shape, "F32", lambda: _f32_chunks(w, seed))]
    bf16 = lambda: (f32_to_bf16(x) for x in _f32_chunks(w, seed))  # noqa: E731
    if not (fp8 and w.fp8):
        return [TensorSpec(w.name, w.shape, "BF16", bf16)]
    # Quantize the BF16 values, so the FP8 checkpoint stores the same model as the BF16 one.
    blocks = lambda: (fp8_quantize(bf16_to_f32(b)) for b in bf16())  # noqa: E731
    scale_shape = tuple(-(-n // FP8_BLOCK) for n in w.shape)
    return [
        TensorSpec(w.name, w.shape, "F8_E4M3", lambda: (q for q, _ in blocks())),
        TensorSpec(w.name + "_scale_inv", scale_shape, "F32", lambda: (s for _, s in blocks())),
    ]


def _write_shards(out: Path, p: Preset, shards: list[list[Weight]], seed: int) -> None:
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map, total = {}, 0
    for name, weights in zip(names, shards, strict=True):
        specs = [s for w in weights for s in tensor_specs(w, seed, p.fp8)]
        total += write_safetensors(out / name, specs)
        weight_map.update({s.name: name for s in specs})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_checkpoint(
    preset: str, out_dir: str | Path, layers: int | None = None, seed: int = 0
) -> Path:
    """Write checkpoint `preset` into `out_dir` (created; must hold no files yet); returns it."""
    p = PRESETS[preset]
    layers = p.layers if layers is None else layers
    if layers < 1:
        raise ValueError("--layers must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    tok = load_tokenizer(p)
    config = config_dict(p, layers, tok)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer.json").write_text(tok.tokenizer_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(tok.config_json, encoding="utf-8")
    _write_shards(out, p, shard_weights(p, layers, config["vocab_size"]), seed)
    return out


def checkpoint_sha256(ckpt: Path) -> str:
    """Hash of the *.safetensors files (names and bytes), to notice a changed generator."""
    h = hashlib.sha256()
    for path in sorted(Path(ckpt).glob("*.safetensors")):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--layers", type=int, default=None, help="num_hidden_layers (default: the preset's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = make_checkpoint(args.preset, args.out_dir, args.layers, args.seed)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{args.preset}: {out} {size / 1e9:.3f} GB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
