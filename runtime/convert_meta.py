"""GGUF metadata for a DeepSeek checkpoint: llama.cpp's `deepseek2` keys with their exact types,
and the tokenizer as `tokenizer.ggml.*` (docs/gguf-deepseek2.md §1, §3.1, §3.7)."""

from __future__ import annotations

import json
from pathlib import Path

from r1cpu.runtime.config import ARCH
from r1cpu.runtime.gguf_reader import STRING
from r1cpu.runtime.gguf_writer import BOOL, FLOAT32, INT32, UINT32, GGUFWriter
from r1cpu.runtime.hf_checkpoint import CheckpointError

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
GATING_FUNC = {"softmax": 1, "sigmoid": 2}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def check_architecture(config: dict, src: Path) -> str:
    archs = config.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"{src}/config.json: unsupported architecture {archs[0] if archs else None!r} "
                              f"(supported: {', '.join(ARCHITECTURES)})")  # fmt: skip
    return archs[0]


def scoring_func(config: dict) -> str:
    # transformers 5 saves V3 configs without scoring_func (its V3 code is always sigmoid); a
    # missing key must not fall back to softmax as llama.cpp's converter does.
    default = "sigmoid" if config["architectures"][0] == "DeepseekV3ForCausalLM" else "softmax"
    func = config.get("scoring_func") or default
    if func not in GATING_FUNC:
        raise CheckpointError(f"config.json: unsupported scoring_func {func!r}")
    return func


def _need(config: dict, key: str):
    if config.get(key) is None:
        raise CheckpointError(f"config.json: missing field {key}")
    return config[key]


def write_hparams(w: GGUFWriter, config: dict, name: str, file_type: int) -> None:
    u32 = lambda key, value: w.add(f"{ARCH}.{key}", int(value), UINT32)  # noqa: E731
    f32 = lambda key, value: w.add(f"{ARCH}.{key}", float(value), FLOAT32)  # noqa: E731
    w.add("general.architecture", ARCH, STRING)
    w.add("general.name", name, STRING)
    w.add("general.file_type", file_type, UINT32)
    w.add("general.quantization_version", 2, UINT32)
    kv_lora, rope = _need(config, "kv_lora_rank"), _need(config, "qk_rope_head_dim")
    nope, v_dim = _need(config, "qk_nope_head_dim"), _need(config, "v_head_dim")
    u32("block_count", _need(config, "num_hidden_layers"))
    u32("context_length", _need(config, "max_position_embeddings"))
    u32("embedding_length", _need(config, "hidden_size"))
    u32("feed_forward_length", _need(config, "intermediate_size"))
    u32("attention.head_count", _need(config, "num_attention_heads"))
    u32("attention.head_count_kv", 1)  # MLA is stored as MQA over the latent (llama.cpp)
    u32("attention.key_length", kv_lora + rope)
    u32("attention.value_length", kv_lora)
    u32("attention.key_length_mla", nope + rope)
    u32("attention.value_length_mla", v_dim)
    # llama.cpp requires the key unless it guesses a "lite" model from the layer count; 0 = no q-LoRA.
    u32("attention.q_lora_rank", config.get("q_lora_rank") or 0)
    u32("attention.kv_lora_rank", kv_lora)
    f32("attention.layer_norm_rms_epsilon", config.get("rms_norm_eps", 1e-6))
    u32("rope.dimension_count", rope)
    f32("rope.freq_base", config.get("rope_theta", 10000.0))
    _write_rope_scaling(w, config)
    u32("leading_dense_block_count", config.get("first_k_dense_replace", 0))
    u32("vocab_size", _need(config, "vocab_size"))
    _write_moe(w, config)


def _write_rope_scaling(w: GGUFWriter, config: dict) -> None:
    rs = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rs.get("type") or rs.get("rope_type")
    if kind in (None, "default"):
        return
    if kind != "yarn":
        raise CheckpointError(f"config.json: unsupported rope_scaling type {kind!r}")
    w.add(f"{ARCH}.rope.scaling.type", "yarn", STRING)
    w.add(f"{ARCH}.rope.scaling.factor", float(rs["factor"]), FLOAT32)
    w.add(f"{ARCH}.rope.scaling.original_context_length", int(rs["original_max_position_embeddings"]), UINT32)
    # llama.cpp divides this key by 0.1 on load ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]).
    w.add(f"{ARCH}.rope.scaling.yarn_log_multiplier", 0.1 * float(rs.get("mscale_all_dim") or 0.0), FLOAT32)
    w.add(f"{ARCH}.rope.scaling.yarn_beta_fast", float(rs.get("beta_fast", 32.0)), FLOAT32)
    w.add(f"{ARCH}.rope.scaling.yarn_beta_slow", float(rs.get("beta_slow", 1.0)), FLOAT32)


def _write_moe(w: GGUFWriter, config: dict) -> None:
    n_expert = config.get("n_routed_experts") or 0
    if not n_expert:
        return
    u32 = lambda key, value: w.add(f"{ARCH}.{key}", int(value), UINT32)  # noqa: E731
    u32("expert_count", n_expert)
    u32("expert_used_count", _need(config, "num_experts_per_tok"))
    u32("expert_shared_count", config.get("n_shared_experts") or 0)
    u32("expert_feed_forward_length", _need(config, "moe_intermediate_size"))
    u32("expert_group_count", config.get("n_group") or 1)
    u32("expert_group_used_count", config.get("topk_group") or 1)
    u32("expert_gating_func", GATING_FUNC[scoring_func(config)])
    w.add(f"{ARCH}.expert_weights_scale", float(config.get("routed_scaling_factor") or 1.0), FLOAT32)
    w.add(f"{ARCH}.expert_weights_norm", bool(config.get("norm_topk_prob", False)), BOOL)


def write_tokenizer(w: GGUFWriter, src: Path, n_vocab: int, config: dict) -> None:
    tok_path, cfg_path = src / "tokenizer.json", src / "tokenizer_config.json"
    for p in (tok_path, cfg_path):
        if not p.exists():
            raise CheckpointError(f"{src}: missing {p.name}")
    tok, tok_cfg = json.loads(tok_path.read_text()), json.loads(cfg_path.read_text())
    if tok.get("model", {}).get("type") != "BPE":
        raise CheckpointError(f"{tok_path}: only byte-level BPE tokenizers are supported")
    tokens, types = _vocab(tok, n_vocab, tok_path)
    ids = {t: i for i, t in enumerate(tokens)}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add("tokenizer.ggml.model", "gpt2", STRING)
    w.add("tokenizer.ggml.pre", pre_tokenizer_name(tok, tok_path), STRING)
    w.add_array("tokenizer.ggml.tokens", tokens, STRING)
    w.add_array("tokenizer.ggml.token_type", types, INT32)
    w.add_array("tokenizer.ggml.merges", merges, STRING)
    for key, field, cfg_key in (("bos", "bos_token", "bos_token_id"), ("eos", "eos_token", "eos_token_id"),
                                ("padding", "pad_token", None)):  # fmt: skip
        tid = _special_id(tok_cfg.get(field), ids)
        tid = config.get(cfg_key) if tid is None and cfg_key else tid
        if tid is not None:
            w.add(f"tokenizer.ggml.{key}_token_id", int(tid), UINT32)
    w.add("tokenizer.ggml.add_bos_token", bool(tok_cfg.get("add_bos_token", True)), BOOL)
    w.add("tokenizer.ggml.add_eos_token", bool(tok_cfg.get("add_eos_token", False)), BOOL)
    if tok_cfg.get("chat_template"):
        w.add("tokenizer.chat_template", tok_cfg["chat_template"], STRING)


def _vocab(tok: dict, n_vocab: int, path: Path) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    kinds = {i: TOKEN_NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        looks_special = added["content"].startswith("<｜") and added["content"].endswith("｜>")
        kinds[added["id"]] = TOKEN_CONTROL if added["special"] or looks_special else TOKEN_USER_DEFINED
    if max(by_id) >= n_vocab:
        raise CheckpointError(f"{path}: token id {max(by_id)} does not fit vocab_size {n_vocab}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [kinds.get(i, TOKEN_UNUSED) for i in range(n_vocab)]
    return tokens, types


def _special_id(value, ids: dict[str, int]):
    content = value.get("content") if isinstance(value, dict) else value
    return ids.get(content) if content else None


def pre_tokenizer_name(tok: dict, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer, recognised from its structure (not by hashing)."""
    pre = json.dumps(tok.get("pre_tokenizer"))
    if r"\\p{N}{1,3}" in pre and "ByteLevel" in pre:
        return "deepseek-v3"
    if '"individual_digits": true' in pre and "ByteLevel" in pre:
        return "deepseek-llm"
    raise CheckpointError(f"{path}: unrecognised pre-tokenizer (expected DeepSeek-V3/R1 or V2)")
