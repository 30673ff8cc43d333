"""The converter's tensor plan: every GGUF tensor of llama.cpp's `deepseek2` MLA layout, its shape,
and a producer that streams its float32 rows from the checkpoint in bounded chunks.

Weight transforms happen here once, never at run time: experts are stacked [E, out, in] expert by
expert, kv_b_proj is split into per-head attn_k_b (transposed) and attn_v_b, and MTP layers
(index >= num_hidden_layers) are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from r1cpu.runtime.hf_checkpoint import Checkpoint, CheckpointError

CHUNK_BYTES = 32 << 20  # float32 rows handed to the quantizer at a time


@dataclass(frozen=True)
class Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    produce: Callable[[], Iterator[np.ndarray]]  # yields float32 [rows, shape[-1]] in order


class Planner:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.cfg = ckpt, ckpt.config
        self.used: set[str] = set()
        self.out: list[Planned] = []

    def source(self, hf_name: str, shape: tuple[int, ...]) -> str:
        """Check an HF tensor exists with the shape the config implies; mark it used."""
        got = self.ckpt.shape(hf_name)
        if got != shape:
            raise CheckpointError(f"tensor {hf_name}: shape {list(got)} does not match config (expected {list(shape)})")
        self.used.add(hf_name)
        return hf_name

    def copy(self, gguf: str, hf_name: str, shape: tuple[int, ...]) -> None:
        src = self.source(hf_name, shape)
        self.out.append(Planned(gguf, shape, lambda: self._rows(src, shape)))

    def _rows(self, src: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        n_rows = shape[0] if len(shape) > 1 else 1
        step = max(1, CHUNK_BYTES // (4 * shape[-1] * max(1, int(np.prod(shape[1:-1])))))
        for start in range(0, n_rows, step):
            if len(shape) == 1:
                yield self.ckpt.rows(src).reshape(1, -1)
            else:
                yield self.ckpt.rows(src, start, min(n_rows, start + step)).reshape(-1, shape[-1])

    def stack(self, gguf: str, hf_names: list[str], shape: tuple[int, ...]) -> None:
        """Stacked experts, produced expert by expert so the whole stack is never in memory."""
        srcs = [self.source(n, shape) for n in hf_names]

        def produce():
            for src in srcs:
                yield from self._rows(src, shape)

        self.out.append(Planned(gguf, (len(srcs),) + shape, produce))

    def split_kv_b(self, prefix: str, hf_name: str, H: int, N: int, V: int, C: int) -> None:
        """attn_k_b[h] = W_UK_h^T (C, N) and attn_v_b[h] = W_UV_h (V, C) from kv_b [H*(N+V), C]."""
        src = self.source(hf_name, (H * (N + V), C))

        def heads(part: slice, transpose: bool):
            kv_b = self.ckpt.rows(src).reshape(H, N + V, C)
            for h in range(H):
                w = kv_b[h, part]
                yield np.ascontiguousarray(w.T if transpose else w)

        self.out.append(Planned(f"{prefix}.attn_k_b.weight", (H, C, N), lambda: heads(slice(0, N), True)))
        self.out.append(Planned(f"{prefix}.attn_v_b.weight", (H, V, C), lambda: heads(slice(N, N + V), False)))


def plan(ckpt: Checkpoint) -> list[Planned]:
    cfg = ckpt.config
    p = Planner(ckpt)
    D, vocab = cfg["hidden_size"], cfg["vocab_size"]
    p.copy("token_embd.weight", "model.embed_tokens.weight", (vocab, D))
    for layer in range(cfg["num_hidden_layers"]):
        _plan_attention(p, layer)
        _plan_ffn(p, layer)
    p.copy("output_norm.weight", "model.norm.weight", (D,))
    if "lm_head.weight" in ckpt.entries or not cfg.get("tie_word_embeddings"):
        p.copy("output.weight", "lm_head.weight", (vocab, D))
    _check_all_used(p)
    return p.out


def _plan_attention(p: Planner, layer: int) -> None:
    cfg = p.cfg
    D, H, C, R = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    N, V, QL = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg.get("q_lora_rank") or 0
    hf, out = f"model.layers.{layer}", f"blk.{layer}"
    p.copy(f"{out}.attn_norm.weight", f"{hf}.input_layernorm.weight", (D,))
    if QL:
        p.copy(f"{out}.attn_q_a.weight", f"{hf}.self_attn.q_a_proj.weight", (QL, D))
        p.copy(f"{out}.attn_q_a_norm.weight", f"{hf}.self_attn.q_a_layernorm.weight", (QL,))
        p.copy(f"{out}.attn_q_b.weight", f"{hf}.self_attn.q_b_proj.weight", (H * (N + R), QL))
    else:
        p.copy(f"{out}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (H * (N + R), D))
    p.copy(f"{out}.attn_kv_a_mqa.weight", f"{hf}.self_attn.kv_a_proj_with_mqa.weight", (C + R, D))
    p.copy(f"{out}.attn_kv_a_norm.weight", f"{hf}.self_attn.kv_a_layernorm.weight", (C,))
    p.split_kv_b(out, f"{hf}.self_attn.kv_b_proj.weight", H, N, V, C)
    p.copy(f"{out}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (D, H * V))
    p.copy(f"{out}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (D,))


def _plan_ffn(p: Planner, layer: int) -> None:
    cfg = p.cfg
    D, hf, out = cfg["hidden_size"], f"model.layers.{layer}.mlp", f"blk.{layer}"
    E = cfg.get("n_routed_experts") or 0
    if not E or layer < cfg.get("first_k_dense_replace", 0):
        ff = cfg["intermediate_size"]
        for w in ("gate", "up"):
            p.copy(f"{out}.ffn_{w}.weight", f"{hf}.{w}_proj.weight", (ff, D))
        p.copy(f"{out}.ffn_down.weight", f"{hf}.down_proj.weight", (D, ff))
        return
    ff = cfg["moe_intermediate_size"]
    p.copy(f"{out}.ffn_gate_inp.weight", f"{hf}.gate.weight", (E, D))
    if f"{hf}.gate.e_score_correction_bias" in p.ckpt.entries:
        p.copy(f"{out}.exp_probs_b.bias", f"{hf}.gate.e_score_correction_bias", (E,))
    for w in ("gate", "up", "down"):
        shape = (D, ff) if w == "down" else (ff, D)
        names = [f"{hf}.experts.{e}.{w}_proj.weight" for e in range(E)]
        p.stack(f"{out}.ffn_{w}_exps.weight", names, shape)
    shared = (cfg.get("n_shared_experts") or 0) * ff
    if shared:
        for w in ("gate", "up"):
            p.copy(f"{out}.ffn_{w}_shexp.weight", f"{hf}.shared_experts.{w}_proj.weight", (shared, D))
        p.copy(f"{out}.ffn_down_shexp.weight", f"{hf}.shared_experts.down_proj.weight", (D, shared))


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _check_all_used(p: Planner) -> None:
    """Every checkpoint tensor must be converted or knowingly skipped; anything else is an error."""
    n_layers = p.cfg["num_hidden_layers"]
    for name in p.ckpt.names():
        m = _LAYER.match(name)
        is_mtp = m is not None and int(m.group(1)) >= n_layers  # MTP: kept for a later side file
        if name in p.used or is_mtp or name.endswith("rotary_emb.inv_freq"):
            continue
        raise CheckpointError(f"{p.ckpt.src}: unexpected tensor {name} (not part of the DeepSeek layout)")
