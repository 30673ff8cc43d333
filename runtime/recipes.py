"""Output type recipes for `r1cpu convert --type`: which storage type each tensor gets.

A recipe maps (GGUF tensor name, numpy shape) to a GGMLType. Mixed recipes (k-quants, per-layer
choices) plug in by adding an entry to RECIPES; the converter only calls `choose`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from r1cpu.quant.registry import GGMLType, get


@dataclass(frozen=True)
class Recipe:
    file_type: int  # general.file_type (llama_ftype)
    pick: Callable[[str, tuple[int, ...]], GGMLType]


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Norms, 1-D tensors, the router and the expert bias stay F32, as llama.cpp keeps them."""
    return len(shape) == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or ".exp_probs_b." in name


def uniform(qtype: GGMLType, fallback: GGMLType = GGMLType.F16) -> Callable:
    """Every matrix in `qtype`; rows too short for its blocks fall back (llama.cpp does the same)."""

    def pick(name: str, shape: tuple[int, ...]) -> GGMLType:
        if keeps_f32(name, shape):
            return GGMLType.F32
        return qtype if shape[-1] % get(qtype).block_size == 0 else fallback

    return pick


RECIPES: dict[str, Recipe] = {
    "f32": Recipe(0, uniform(GGMLType.F32)),
    "f16": Recipe(1, uniform(GGMLType.F16)),
    "bf16": Recipe(32, uniform(GGMLType.BF16)),
    "q8_0": Recipe(7, uniform(GGMLType.Q8_0)),
    "q4_0": Recipe(2, uniform(GGMLType.Q4_0)),
}


def recipe(out_type: str) -> Recipe:
    try:
        return RECIPES[out_type.lower()]
    except KeyError:
        raise ValueError(f"unknown output type {out_type!r} (choose from {', '.join(RECIPES)})") from None
