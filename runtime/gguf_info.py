"""A human-readable summary of a GGUF file (`r1cpu info`, `make demo`)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.gguf_reader import GGUFFile


def describe(path, list_tensors: bool = False) -> str:
    g = GGUFFile(path)
    cfg = ModelConfig.from_gguf(g.kv)
    n_params = sum(int(np.prod(t.shape)) for t in g.tensors.values())
    n_bytes = sum(t.nbytes for t in g.tensors.values())
    types = Counter(t.qtype.name for t in g.tensors.values())
    lines = [
        f"{path}: {g.kv.get('general.name', '?')} ({g.kv['general.architecture']})",
        f"  tensors {len(g.tensors)} ({', '.join(f'{k} {v}' for k, v in sorted(types.items()))}),"
        f" {n_params / 1e6:.2f} M params, {n_bytes / 1e6:.1f} MB, {8 * n_bytes / max(n_params, 1):.2f} bits/weight",
        f"  layers {cfg.n_layer} (dense {min(cfg.n_dense_lead, cfg.n_layer) if cfg.n_expert else cfg.n_layer}),"
        f" hidden {cfg.n_embd}, heads {cfg.n_head}, vocab {cfg.n_vocab}, context {cfg.n_ctx_train}",
        f"  MLA: q_lora {cfg.q_lora_rank or 'none'}, kv_lora {cfg.kv_lora_rank}, nope {cfg.qk_nope_head_dim},"
        f" rope {cfg.qk_rope_head_dim}, v {cfg.v_head_dim}; rope {cfg.rope_scaling}"
        + (f" x{cfg.rope_factor:g} from {cfg.rope_orig_ctx}" if cfg.rope_scaling == "yarn" else ""),
    ]
    if cfg.n_expert:
        lines.append(
            f"  MoE: {cfg.n_expert} experts of {cfg.n_ff_exp}, {cfg.n_expert_used} used, {cfg.n_expert_shared} shared,"
            f" {cfg.gating} gating, groups {cfg.n_group}/{cfg.n_group_used}, scale {cfg.expert_weights_scale:g},"
            f" norm {cfg.expert_weights_norm}"
        )
    lines.append(f"  tokenizer: {g.kv.get('tokenizer.ggml.model')}/{g.kv.get('tokenizer.ggml.pre')}, "
                 f"chat template {'yes' if 'tokenizer.chat_template' in g.kv else 'no'}")  # fmt: skip
    if list_tensors:
        lines += [f"  {t.name:40s} {t.qtype.name:5s} {list(t.shape)}" for t in g.tensors.values()]
    return "\n".join(lines)
