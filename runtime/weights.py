"""Per-layer named weight views of a deepseek2 GGUF, every shape checked against the config at load.

Names follow llama.cpp (gguf-deepseek2.md §2). Shapes are numpy order, (out, in) for linear weights:

    token_embd     (V, D)            output (V, D), absent -> tied to token_embd
    attn_q_a       (q_lora, D)       attn_q_a_norm (q_lora,)     attn_q_b (H*(N+R), q_lora)
    attn_q         (H*(N+R), D)      (files without q-LoRA)
    attn_kv_a_mqa  (C+R, D)          attn_kv_a_norm (C,)
    attn_k_b       (H, C, N)         attn_v_b (H, V, C)          (MLA files)
    attn_kv_b      (H*(N+V), C)      (legacy files: per head rows [k_nope N ; v V])
    attn_output    (D, H*V)
    ffn_gate/up    (n_ff, D)         ffn_down (D, n_ff)           (dense blocks)
    ffn_gate_inp   (E, D)            exp_probs_b.bias (E,)        (MoE blocks; bias optional)
    ffn_gate_exps / ffn_up_exps (E, F, D)   ffn_down_exps (E, D, F)
    ffn_*_shexp    (F*S, D) / (D, F*S)

Matrices stay zero-copy `Tensor` views of the file. 1-D vectors (norms, router bias) are float32
views when stored as F32 (converters always do), otherwise small dequantized copies. The one
derived weight: legacy files get a float32 W_UK^T (H, C, N) built once so decode can absorb.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r1cpu.kernels_numba import dispatch, fused_moe, mla_decode
from r1cpu.quant.registry import GGMLType, dequantize
from r1cpu.quant.tensor import Tensor
from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.gguf_reader import GGUFError, GGUFFile


def linear(x: np.ndarray, w: Tensor) -> np.ndarray:
    """x (T, in) -> (T, out) through the dispatch table. A single row goes to the matvec kernel
    (reads the stored bytes directly: the decode case), several rows to the batched one."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] == 1:
        return dispatch.linear(x[0], w)[None, :]
    return dispatch.linear(x, w)


@dataclass(frozen=True)
class AttnWeights:
    q_a: Tensor | None  # (q_lora, D)
    q_a_norm: np.ndarray | None  # (q_lora,)
    q_b: Tensor | None  # (H*(N+R), q_lora)
    q: Tensor | None  # (H*(N+R), D), only without q-LoRA
    kv_a_mqa: Tensor  # (C+R, D): rows [0,C) latent, [C,C+R) k_pe
    kv_a_norm: np.ndarray  # (C,)
    k_b: Tensor  # (H, C, N): q_lat_h = linear(q_nope_h, k_b[h])
    v_b: Tensor  # (H, V, C): o_h = linear(o_lat_h, v_b[h])
    kv_b: Tensor | None  # (H*(N+V), C), legacy files only: naive expansion of k_nope and v
    output: Tensor  # (D, H*V)
    k_b_heads: tuple[Tensor, ...] = ()  # k_b[h], sliced once at load
    v_b_heads: tuple[Tensor, ...] = ()  # v_b[h]
    absorb: tuple | None = None  # (kinds, k_b, v_b) of the one-token kernel (mla_decode.plan), if it reads them

    def __post_init__(self):
        object.__setattr__(self, "k_b_heads", tuple(self.k_b[h] for h in range(self.k_b.shape[0])))
        object.__setattr__(self, "v_b_heads", tuple(self.v_b[h] for h in range(self.v_b.shape[0])))
        object.__setattr__(self, "absorb", mla_decode.plan(self.k_b.qtype, self.k_b.data, self.v_b.qtype, self.v_b.data))


@dataclass(frozen=True)
class DenseWeights:
    gate: Tensor  # (n_ff, D)
    up: Tensor  # (n_ff, D)
    down: Tensor  # (D, n_ff)


@dataclass(frozen=True)
class MoEWeights:
    gate_inp: Tensor  # (E, D) router
    probs_bias: np.ndarray | None  # (E,) selection-only bias (noaux_tc)
    gate_exps: Tensor  # (E, F, D)
    up_exps: Tensor  # (E, F, D)
    down_exps: Tensor  # (E, D, F)
    shared: DenseWeights | None  # (F*S, D) / (D, F*S)
    experts: tuple[DenseWeights, ...] = ()  # per expert: views gate_exps[e], up_exps[e], down_exps[e]
    # Under --max-ram: this layer's part of runtime/expert_cache.ExpertCache (resolve, views,
    # n_slots); routed experts then come from its pools and are never read through the map.
    store: object | None = None
    fused: tuple | None = None  # (kinds, shared pools) of the one-token kernel (fused_moe.plan), if it reads them
    batch: tuple | None = None  # (kinds, q_max) of the prefill kernel (fused_moe.batch_plan), if it decodes them

    def __post_init__(self):
        # Slice once at load: the decode loop then touches no Tensor/memmap slicing per token.
        n = self.gate_exps.shape[0]
        views = tuple(DenseWeights(self.gate_exps[e], self.up_exps[e], self.down_exps[e]) for e in range(n))
        object.__setattr__(self, "experts", views)
        nbytes = np.array([v.gate.nbytes + v.up.nbytes + v.down.nbytes for v in views], np.int64)
        object.__setattr__(self, "expert_bytes", nbytes)  # (E,): what ExpertStats adds per use
        object.__setattr__(self, "fused", fused_moe.plan(self.gate_exps, self.up_exps, self.down_exps, self.shared))
        object.__setattr__(self, "batch", fused_moe.batch_plan(self.gate_exps, self.up_exps, self.down_exps))

    def resolve(self, expert_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(gate_pool, up_pool, down_pool, slots): pools (slots, rows, row_bytes or elements) and the
        int64 slot of each expert id. Without a cache the pools are the file's stacked ffn_*_exps
        data and slot == expert id; with one, cache-owned pools whose slots keep these experts until
        this layer's next resolve (at most `capacity` distinct ids per call)."""
        ids = np.asarray(expert_ids, dtype=np.int64).reshape(-1)
        if self.store is None:
            return self.gate_exps.data, self.up_exps.data, self.down_exps.data, ids
        return self.store.resolve(ids)

    def slot_ffn(self, slot: int) -> DenseWeights:
        """Tensor views of one pool slot, for the per-expert linear path."""
        return self.experts[slot] if self.store is None else self.store.views[slot]

    @property
    def capacity(self) -> int:
        """Distinct experts one resolve() can hold at once."""
        return len(self.experts) if self.store is None else self.store.n_slots

    def expert_nbytes(self, e: int) -> int:
        """Bytes read to run routed expert e once: its three slices."""
        return int(self.expert_bytes[e])


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # (D,)
    attn: AttnWeights
    ffn_norm: np.ndarray  # (D,)
    ffn: DenseWeights | MoEWeights


@dataclass(frozen=True)
class ModelWeights:
    token_embd: Tensor  # (V, D)
    output_norm: np.ndarray  # (D,)
    output: Tensor  # (V, D); token_embd when tied
    layers: list[LayerWeights]
    mla_layout: str  # "split" (attn_k_b/attn_v_b) or "legacy" (attn_kv_b)


class _Loader:
    """Looks tensors up by name and checks their shapes; errors name the file and the tensor."""

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def mat(self, name: str, shape: tuple[int, ...]) -> Tensor:
        t = self.gguf.tensor(name)  # GGUFError "<file>: missing tensor <name>"
        if tuple(t.shape) != tuple(shape):
            raise GGUFError(
                f"{self.gguf.path}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)} from the metadata"
            )
        return t

    def vec(self, name: str, n: int) -> np.ndarray:
        t = self.mat(name, (n,))
        if t.qtype == GGMLType.F32:
            return np.asarray(t.data)  # plain ndarray view of the map
        return dequantize(t.data, t.qtype).astype(np.float32).reshape(n)


def _f32_matrix(t: Tensor) -> np.ndarray:
    if t.qtype == GGMLType.F32:
        return np.asarray(t.data)
    return dequantize(t.data, t.qtype).astype(np.float32).reshape(t.shape)


def _attn(ld: _Loader, cfg: ModelConfig, p: str, layout: str) -> AttnWeights:
    D, H, C, R = cfg.n_embd, cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    N, V, QL = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    q_a = q_a_norm = q_b = q = kv_b = None
    if QL > 0:
        q_a = ld.mat(p + "attn_q_a.weight", (QL, D))
        q_a_norm = ld.vec(p + "attn_q_a_norm.weight", QL)
        q_b = ld.mat(p + "attn_q_b.weight", (H * (N + R), QL))
    else:
        q = ld.mat(p + "attn_q.weight", (H * (N + R), D))
    if layout == "split":
        k_b = ld.mat(p + "attn_k_b.weight", (H, C, N))
        v_b = ld.mat(p + "attn_v_b.weight", (H, V, C))
    else:
        kv_b = ld.mat(p + "attn_kv_b.weight", (H * (N + V), C))
        per_head = kv_b.data.reshape((H, N + V) + kv_b.data.shape[1:])
        v_b = Tensor(kv_b.name + "[v]", kv_b.qtype, (H, V, C), per_head[:, N:])  # view
        w_uk = _f32_matrix(kv_b).reshape(H, N + V, C)[:, :N]  # (H, N, C)
        k_b = Tensor(kv_b.name + "[k^T]", GGMLType.F32, (H, C, N), np.ascontiguousarray(w_uk.transpose(0, 2, 1)))
    return AttnWeights(
        q_a=q_a, q_a_norm=q_a_norm, q_b=q_b, q=q,
        kv_a_mqa=ld.mat(p + "attn_kv_a_mqa.weight", (C + R, D)),
        kv_a_norm=ld.vec(p + "attn_kv_a_norm.weight", C),
        k_b=k_b, v_b=v_b, kv_b=kv_b,
        output=ld.mat(p + "attn_output.weight", (D, H * V)),
    )  # fmt: skip


def _dense(ld: _Loader, p: str, suffix: str, d: int, ff: int) -> DenseWeights:
    return DenseWeights(
        gate=ld.mat(f"{p}ffn_gate{suffix}.weight", (ff, d)),
        up=ld.mat(f"{p}ffn_up{suffix}.weight", (ff, d)),
        down=ld.mat(f"{p}ffn_down{suffix}.weight", (d, ff)),
    )


def _moe(ld: _Loader, cfg: ModelConfig, p: str) -> MoEWeights:
    D, E, F = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp
    if ld.has(p + "ffn_gate_up_exps.weight"):  # fused form: gate rows first, then up
        fused = ld.mat(p + "ffn_gate_up_exps.weight", (E, 2 * F, D))
        gate = Tensor(fused.name + "[gate]", fused.qtype, (E, F, D), fused.data[:, :F])
        up = Tensor(fused.name + "[up]", fused.qtype, (E, F, D), fused.data[:, F:])
    else:
        gate = ld.mat(p + "ffn_gate_exps.weight", (E, F, D))
        up = ld.mat(p + "ffn_up_exps.weight", (E, F, D))
    bias_name = p + "exp_probs_b.bias"
    return MoEWeights(
        gate_inp=ld.mat(p + "ffn_gate_inp.weight", (E, D)),
        probs_bias=ld.vec(bias_name, E) if ld.has(bias_name) else None,
        gate_exps=gate,
        up_exps=up,
        down_exps=ld.mat(p + "ffn_down_exps.weight", (E, D, F)),
        shared=_dense(ld, p, "_shexp", D, F * cfg.n_expert_shared) if cfg.n_expert_shared > 0 else None,
    )


def _check_config(cfg: ModelConfig, path) -> None:
    problems = []
    if cfg.n_expert:
        if not 0 < cfg.n_expert_used <= cfg.n_expert:
            problems.append(f"expert_used_count {cfg.n_expert_used} not in 1..{cfg.n_expert}")
        if cfg.n_expert % cfg.n_group:
            problems.append(f"expert_count {cfg.n_expert} not divisible by expert_group_count {cfg.n_group}")
        if cfg.n_group_used > cfg.n_group:
            problems.append(f"expert_group_used_count {cfg.n_group_used} > expert_group_count {cfg.n_group}")
        if cfg.n_ff_exp <= 0:
            problems.append("expert_feed_forward_length missing")
    if cfg.qk_rope_head_dim % 2 or cfg.qk_nope_head_dim < 0:
        problems.append(f"bad head dims (nope {cfg.qk_nope_head_dim}, rope {cfg.qk_rope_head_dim})")
    if problems:
        raise GGUFError(f"{path}: inconsistent metadata: " + "; ".join(problems))


def load_weights(gguf: GGUFFile, cfg: ModelConfig) -> ModelWeights:
    _check_config(cfg, gguf.path)
    ld = _Loader(gguf)
    D, V = cfg.n_embd, cfg.n_vocab
    layout = "split" if ld.has("blk.0.attn_k_b.weight") or not ld.has("blk.0.attn_kv_b.weight") else "legacy"
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        ffn = _moe(ld, cfg, p) if cfg.is_moe_layer(i) else _dense(ld, p, "", D, cfg.n_ff)
        attn = _attn(ld, cfg, p, layout)
        layers.append(LayerWeights(ld.vec(p + "attn_norm.weight", D), attn, ld.vec(p + "ffn_norm.weight", D), ffn))
    token_embd = ld.mat("token_embd.weight", (V, D))
    return ModelWeights(
        token_embd=token_embd,
        output_norm=ld.vec("output_norm.weight", D),
        output=ld.mat("output.weight", (V, D)) if ld.has("output.weight") else token_embd,
        layers=layers,
        mla_layout=layout,
    )
