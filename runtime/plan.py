"""`r1cpu plan`: what a model needs in memory and how fast it can decode, without converting it.

From a GGUF (its own tensor types, or a recipe's with --type) or a Hugging Face config.json (the
converter's tensor layout, the recipe's types): exact tensor bytes from the quant registry, split
into resident weights and routed experts; the bytes one decoded token reads; the MLA latent cache
against the full K/V cache it replaces; the expert cache a --max-ram budget leaves; and a decode
speed bound: bytes per token over memory bandwidth, plus expert misses over disk speed.

Routed-expert misses are estimated with uniform routing (hit rate = slots / experts, what LRU gets
on uniform picks); real routing is skewed, so this errs on the slow side.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import click
import psutil

from r1cpu.quant.registry import GGMLType, get
from r1cpu.runtime.cli_errors import one_line_errors
from r1cpu.runtime.expert_cache import EXPERT_TENSOR
from r1cpu.runtime.memory import disk_read_speed, fmt_size, parse_size, read_bandwidth
from r1cpu.runtime.recipes import RECIPES, choose, recipe

DEFAULT_DISK_GBS = 2.0  # a PCIe 3/4 NVMe drive's sequential read, when nothing is measured
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Arch:
    """The sizes the plan needs, from GGUF metadata or config.json."""

    name: str
    n_layer: int
    n_head: int  # H
    kv_lora_rank: int  # C
    rope: int  # R
    nope: int  # N
    v: int  # V
    n_expert: int  # E
    n_expert_used: int  # K


def hf_tensors(config: dict) -> list[tuple[str, Shape]]:
    """(GGUF name, numpy shape) of every tensor `r1cpu convert` writes for this config.json, in
    the converter's order (runtime/convert_tensors.py; a test holds the two together)."""
    D, V_ = config["hidden_size"], config["vocab_size"]
    out = [("token_embd.weight", (V_, D))]
    for i in range(config["num_hidden_layers"]):
        out += _hf_attention(config, f"blk.{i}") + _hf_ffn(config, i, f"blk.{i}")
    out.append(("output_norm.weight", (D,)))
    if not config.get("tie_word_embeddings"):
        out.append(("output.weight", (V_, D)))
    return out


def _hf_attention(c: dict, p: str) -> list[tuple[str, Shape]]:
    D, H, C, R = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    N, V, QL = c["qk_nope_head_dim"], c["v_head_dim"], c.get("q_lora_rank") or 0
    q = [(f"{p}.attn_q_a.weight", (QL, D)), (f"{p}.attn_q_a_norm.weight", (QL,)),
         (f"{p}.attn_q_b.weight", (H * (N + R), QL))] if QL else [(f"{p}.attn_q.weight", (H * (N + R), D))]  # fmt: skip
    return [(f"{p}.attn_norm.weight", (D,))] + q + [
        (f"{p}.attn_kv_a_mqa.weight", (C + R, D)), (f"{p}.attn_kv_a_norm.weight", (C,)),
        (f"{p}.attn_k_b.weight", (H, C, N)), (f"{p}.attn_v_b.weight", (H, V, C)),
        (f"{p}.attn_output.weight", (D, H * V)), (f"{p}.ffn_norm.weight", (D,)),
    ]  # fmt: skip


def _hf_ffn(c: dict, i: int, p: str) -> list[tuple[str, Shape]]:
    D, E = c["hidden_size"], c.get("n_routed_experts") or 0
    if not E or i < c.get("first_k_dense_replace", 0):
        ff = c["intermediate_size"]
        return [(f"{p}.ffn_gate.weight", (ff, D)), (f"{p}.ffn_up.weight", (ff, D)), (f"{p}.ffn_down.weight", (D, ff))]
    ff, S = c["moe_intermediate_size"], (c.get("n_shared_experts") or 0) * c["moe_intermediate_size"]
    out = [(f"{p}.ffn_gate_inp.weight", (E, D))]
    if _has_bias(c):
        out.append((f"{p}.exp_probs_b.bias", (E,)))
    out += [(f"{p}.ffn_gate_exps.weight", (E, ff, D)), (f"{p}.ffn_up_exps.weight", (E, ff, D)),
            (f"{p}.ffn_down_exps.weight", (E, D, ff))]  # fmt: skip
    if S:
        out += [(f"{p}.ffn_gate_shexp.weight", (S, D)), (f"{p}.ffn_up_shexp.weight", (S, D)),
                (f"{p}.ffn_down_shexp.weight", (D, S))]  # fmt: skip
    return out


def _has_bias(c: dict) -> bool:
    """V3/R1 checkpoints carry e_score_correction_bias (noaux_tc); V2 ones do not."""
    v3 = (c.get("architectures") or [""])[0] == "DeepseekV3ForCausalLM"
    return c.get("topk_method", "noaux_tc" if v3 else "greedy") == "noaux_tc"


def hf_arch(c: dict, name: str) -> Arch:
    return Arch(name, c["num_hidden_layers"], c["num_attention_heads"], c["kv_lora_rank"], c["qk_rope_head_dim"],
                c["qk_nope_head_dim"], c["v_head_dim"], c.get("n_routed_experts") or 0,
                c.get("num_experts_per_tok") or 0)  # fmt: skip


def tensor_bytes(shape: Shape, qtype: GGMLType) -> int:
    return math.prod(shape[:-1]) * get(qtype).row_bytes(shape[-1])


def read_source(path: str | Path, out_type: str | None) -> tuple[Arch, list[tuple[str, Shape, GGMLType]]]:
    """A GGUF or a config.json (or a folder holding one) -> its sizes and (name, shape, type) per tensor."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        config = _config(path)
        tensors = hf_tensors(config)
        types = choose(recipe(out_type or "q8_0"), tensors)
        name = path.parent.name if path.name == "config.json" else path.name.removesuffix(".json")
        return hf_arch(config, name), [(n, s, t) for (n, s), t in zip(tensors, types)]
    return _gguf_source(path, out_type)


def _config(path: Path) -> dict:
    from r1cpu.runtime.hf_checkpoint import check_config

    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    check_config(config, path)  # one-line errors for missing or out-of-range fields
    return config


def _gguf_source(path: Path, out_type: str | None):
    from r1cpu.runtime.config import ModelConfig
    from r1cpu.runtime.gguf_reader import GGUFFile

    g = GGUFFile(path)
    cfg = ModelConfig.from_gguf(g.kv)
    arch = Arch(path.name, cfg.n_layer, cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.n_expert, cfg.n_expert_used)  # fmt: skip
    named = [(t.name, t.shape) for t in g.tensors.values()]
    types = choose(recipe(out_type), named) if out_type else [t.qtype for t in g.tensors.values()]
    return arch, [(n, s, t) for (n, s), t in zip(named, types)]


@dataclass(frozen=True)
class Sizes:
    params: int
    file: int  # tensor bytes (the header adds a few MB of metadata and vocabulary)
    resident: int  # every tensor but the routed experts
    embd: int  # token_embd when a separate output exists: read one row per token
    embd_row: int
    expert_slot: int  # one expert of every MoE layer (bytes a cache slot holds across layers)
    experts: int  # all routed experts
    active_params: int


def sizes(arch: Arch, tensors: list[tuple[str, Shape, GGMLType]]) -> Sizes:
    names = {n for n, _, _ in tensors}
    total = resident = embd = embd_row = slot = params = routed_params = 0
    for name, shape, qtype in tensors:
        nbytes, n = tensor_bytes(shape, qtype), math.prod(shape)
        total, params = total + nbytes, params + n
        if EXPERT_TENSOR.search(name):
            slot += nbytes // shape[0]
            routed_params += n
        else:
            resident += nbytes
        if name == "token_embd.weight" and "output.weight" in names:
            embd, embd_row = nbytes, nbytes // shape[0]
    # Active: all but the routed experts and the embedding table, plus K experts per layer and one row.
    n_moe = sum(1 for n, _, _ in tensors if ".ffn_gate_inp." in n)
    per_expert = routed_params // max(arch.n_expert * n_moe, 1)
    embd_params = next((math.prod(s) for n, s, _ in tensors if n == "token_embd.weight"), 0) if embd else 0
    active = params - routed_params - embd_params + arch.n_expert_used * n_moe * per_expert
    return Sizes(params, total, resident, embd, embd_row, slot, total - resident, active)


@dataclass(frozen=True)
class Speed:
    bandwidth: float  # GB/s
    bandwidth_from: str  # "measured" or "given"
    disk: float
    disk_from: str  # "measured", "given" or "assumed"


def token_bytes(arch: Arch, s: Sizes) -> int:
    """Weight bytes one decoded token reads: resident ones, one embedding row, K experts per layer."""
    return s.resident - s.embd + s.embd_row + arch.n_expert_used * s.expert_slot


def kv_bytes(arch: Arch, ctx: int) -> dict[str, int]:
    """MLA latent cache (C + R values per token per layer) vs the full per-head K and V."""
    latent = (arch.kv_lora_rank + arch.rope) * arch.n_layer * ctx
    full = arch.n_head * ((arch.nope + arch.rope) + arch.v) * arch.n_layer * ctx
    return {"latent_f32": 4 * latent, "latent_f16": 2 * latent, "full_f16": 2 * full}


def expert_slots(arch: Arch, s: Sizes, max_ram: int) -> int:
    """Cache slots per MoE layer the budget leaves (as runtime/expert_cache.split_budget), capped at E."""
    if s.expert_slot == 0:
        return 0
    return min(arch.n_expert, max(0, max_ram - s.resident) // s.expert_slot)


def decode_rate(arch: Arch, s: Sizes, speed: Speed, ctx: int, slots: int | None) -> tuple[float, int]:
    """(tokens/s, bytes read from disk per token) at the end of a ctx-token context."""
    ram = token_bytes(arch, s) + kv_bytes(arch, ctx)["latent_f32"]  # attention reads the whole cache
    hit = 1.0 if slots is None or not arch.n_expert else slots / arch.n_expert
    spill = int((1.0 - hit) * arch.n_expert_used * s.expert_slot)
    seconds = ram / (speed.bandwidth * 1e9) + spill / (speed.disk * 1e9)
    return 1.0 / seconds, spill


def measure_speed(path: Path, bandwidth: float | None, disk: float | None) -> Speed:
    bw = (bandwidth, "given") if bandwidth else (read_bandwidth(), "measured")
    if disk:
        dk = (disk, "given")
    else:
        got = disk_read_speed(path) if path.suffix == ".gguf" else None
        dk = (got, "measured") if got else (DEFAULT_DISK_GBS, "assumed for NVMe")
    return Speed(bw[0], bw[1], dk[0], dk[1])


def render(arch: Arch, out_type: str, s: Sizes, ctx: int, max_ram: int | None, speed: Speed) -> str:
    g = lambda n: f"{fmt_size(n)} ({n / 1e9:.1f} GB)"  # noqa: E731
    kv = kv_bytes(arch, ctx)
    lines = [
        f"{arch.name}, {out_type}: {s.params / 1e9:.2f} B parameters, {s.active_params / 1e9:.2f} B active per token",
        f"  file           {g(s.file)} of tensor data, {8 * s.file / s.params:.2f} bits per weight",
        f"  resident       {g(s.resident)}: attention, dense and shared FFNs, router, norms, embeddings, output",
        f"  routed experts {g(s.experts)}: {arch.n_expert} per MoE layer, one expert of every layer "
        f"{fmt_size(s.expert_slot)}, {arch.n_expert_used} used per token",
        f"  per token      {g(token_bytes(arch, s))} of weights read (one embedding row, {arch.n_expert_used} "
        f"experts per layer) + {fmt_size(kv['latent_f32'])} of cache at position {ctx}",
        f"  KV at {ctx:<8} MLA latent {arch.kv_lora_rank + arch.rope} values per token per layer: "
        f"{fmt_size(kv['latent_f32'])} in F32 (as r1cpu stores it), {fmt_size(kv['latent_f16'])} in F16; "
        f"full K/V 2*{arch.n_head}*({arch.nope + arch.rope}|{arch.v})*{arch.n_layer} would need "
        f"{fmt_size(kv['full_f16'])} in F16",
    ]
    slots = None
    if max_ram is not None:
        slots = expert_slots(arch, s, max_ram)
        lines.append(_budget_line(arch, s, max_ram, slots))
    elif s.file > psutil.virtual_memory().total:
        lines.append(f"  this machine   {fmt_size(psutil.virtual_memory().total)} of RAM: the file does not fit, "
                     "and without --max-ram the OS pages experts in 4 KiB at a time")  # fmt: skip
    if slots is not None and slots < arch.n_expert_used:
        return "\n".join(lines)
    rate, spill = decode_rate(arch, s, speed, ctx, slots)
    lines.append(f"  decode bound   {rate:.2f} tokens/s at position {ctx}: bandwidth {speed.bandwidth:.1f} GB/s "
                 f"({speed.bandwidth_from})" + (f", {fmt_size(spill)} per token from disk at {speed.disk:.1f} GB/s "
                 f"({speed.disk_from})" if spill else ""))  # fmt: skip
    return "\n".join(lines)


def _budget_line(arch: Arch, s: Sizes, max_ram: int, slots: int) -> str:
    need = s.resident + arch.n_expert_used * s.expert_slot
    head = f"  --max-ram      {fmt_size(max_ram)}"
    if slots < arch.n_expert_used:
        return f"{head} is too small: at least {fmt_size(need)} ({arch.n_expert_used} experts per layer)"
    return (f"{head}: expert cache {fmt_size(slots * s.expert_slot)}, {slots}/{arch.n_expert} slots per layer; "
            f"uniform routing would hit {slots / max(arch.n_expert, 1):.0%}")  # fmt: skip


def plan(source, out_type: str | None = None, ctx: int = 1024, max_ram: int | str | None = None,
         bandwidth: float | None = None, disk: float | None = None) -> str:  # fmt: skip
    if ctx < 1:
        raise ValueError(f"--ctx {ctx}: must be at least 1")
    arch, tensors = read_source(source, out_type)
    label = out_type or ("file types" if Path(source).suffix == ".gguf" else "q8_0")
    budget = None if max_ram is None else parse_size(max_ram)
    return render(arch, label, sizes(arch, tensors), ctx, budget, measure_speed(Path(source), bandwidth, disk))


@click.command("plan")
@click.argument("model", type=click.Path(exists=True))
@click.option("--type", "out_type", type=click.Choice(sorted(RECIPES)), default=None,
              help="storage types to plan for (default: a GGUF's own, q8_0 for a config.json)")
@click.option("--ctx", type=int, default=1024, show_default=True, help="context length for the cache figures")
@click.option("--max-ram", default=None, metavar="SIZE", help="weight budget as for generate, e.g. 200G")
@click.option("--bandwidth", type=float, default=None, help="memory read GB/s (default: measured here)")
@click.option("--disk", type=float, default=None,
              help=f"disk read GB/s (default: measured on a GGUF's uncached pages, else {DEFAULT_DISK_GBS:g})")
@one_line_errors
def plan_command(model, out_type, ctx, max_ram, bandwidth, disk):
    """Memory and speed plan for MODEL (a GGUF, or a Hugging Face config.json or its folder)."""
    click.echo(plan(model, out_type, ctx, max_ram, bandwidth, disk))
