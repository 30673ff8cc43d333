"""Output type recipes for `r1cpu convert --type`: which storage type each tensor gets.

A recipe maps (GGUF tensor name, numpy shape, Model) to a GGMLType; `Model` holds the few facts about
the whole file that llama-quantize's choices depend on. The converter calls only `choose`, which
also applies `--tensor-type PATTERN=TYPE` overrides.

  f32 f16 bf16 q8_0 q4_0          every matrix in one type ("pure", as llama-quantize --pure)
  q2_k q3_k_m q4_k_s q4_k_m       llama-quantize's k-quant mixes as src/llama-quant.cpp applies them
  q5_k_m q6_k                     to deepseek2 (output Q6_K, more bits for some ffn_down layers, the
                                  n_expert == 8 attn_output rule), so the bytes equal llama.cpp's
Rows too short for a type's blocks fall back as llama.cpp's `tensor_type_fallback` does: Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0, and F16 when even that does not fit (DeepSeek's
attn_k_b rows have qk_nope = 128 elements). The legacy attn_kv_b rules are left out: the converter
always writes the MLA layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from r1cpu.quant.registry import GGMLType, get

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K
Shape = tuple[int, ...]
FALLBACK = {Q2_K: GGMLType.Q4_0, Q3_K: GGMLType.Q4_0, Q4_K: GGMLType.Q5_0, Q5_K: GGMLType.Q5_1, Q6_K: GGMLType.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Model:
    """What the mixes depend on beyond one tensor, read off the list of (name, shape)."""

    n_layer: int
    n_expert: int  # 0: no MoE layers
    tied_output: bool  # no output.weight: token_embd is also the output projection

    @classmethod
    def of(cls, tensors: Sequence[tuple[str, Shape]]) -> "Model":
        layers = [int(m.group(1)) for name, _ in tensors if (m := _LAYER.match(name))]
        experts = [shape[0] for name, shape in tensors if ".ffn_gate_inp." in name]
        names = {name for name, _ in tensors}
        return cls(max(layers, default=-1) + 1, max(experts, default=0), "output.weight" not in names)


@dataclass(frozen=True)
class Recipe:
    file_type: int  # general.file_type (llama_ftype)
    pick: Callable[[str, Shape, Model], GGMLType]


def keeps_f32(name: str, shape: Shape) -> bool:
    """Norms, 1-D tensors, the router and the expert bias stay F32, as llama.cpp keeps them."""
    return len(shape) == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or ".exp_probs_b." in name


def fit(qtype: GGMLType, shape: Shape) -> GGMLType:
    """qtype, or llama.cpp's fallback when the row length is not a multiple of its block."""
    n = shape[-1]
    if n % get(qtype).block_size == 0:
        return qtype
    fallback = FALLBACK.get(qtype, qtype)
    return fallback if n % get(fallback).block_size == 0 else GGMLType.F16


def uniform(qtype: GGMLType) -> Callable[[str, Shape, Model], GGMLType]:
    """Every matrix in `qtype` (with the fallback for short rows)."""

    def pick(name: str, shape: Shape, model: Model) -> GGMLType:
        return GGMLType.F32 if keeps_f32(name, shape) else fit(qtype, shape)

    return pick


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class LlamaMix:
    """One llama-quantize k-quant mix (llama_tensor_get_type_impl) for deepseek2 tensor names."""

    mix: str  # the llama-quantize type name, lower case
    default: GGMLType

    def __call__(self, name: str, shape: Shape, model: Model) -> GGMLType:
        if keeps_f32(name, shape):
            return GGMLType.F32
        return fit(self.choose(name, shape, model), shape)

    def choose(self, name: str, shape: Shape, model: Model) -> GGMLType:
        if name == "output.weight" or (name == "token_embd.weight" and model.tied_output):
            return GGMLType.Q8_0 if shape[-1] % get(self.default).block_size else Q6_K
        if "ffn_down" in name:
            return self.ffn_down(int(_LAYER.match(name).group(1)), model.n_layer)
        if "attn_output.weight" in name:
            if model.n_expert == 8:  # llama.cpp's rule for Mixtral-style 8-expert models
                return Q5_K if self.mix in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m") else self.default
            return {"q2_k": Q3_K, "q3_k_m": Q4_K}.get(self.mix, self.default)
        return self.default

    def ffn_down(self, i: int, n: int) -> GGMLType:
        if self.mix == "q2_k":
            return Q3_K
        if self.mix == "q3_k_m":
            return Q5_K if i < n // 16 else Q4_K
        if self.mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return Q6_K
        if self.mix == "q4_k_s" and i < n // 8:
            return Q5_K
        return self.default


RECIPES: dict[str, Recipe] = {
    "f32": Recipe(0, uniform(GGMLType.F32)),
    "f16": Recipe(1, uniform(GGMLType.F16)),
    "bf16": Recipe(32, uniform(GGMLType.BF16)),
    "q8_0": Recipe(7, uniform(GGMLType.Q8_0)),
    "q4_0": Recipe(2, uniform(GGMLType.Q4_0)),
    "q2_k": Recipe(10, LlamaMix("q2_k", Q2_K)),
    "q3_k_m": Recipe(12, LlamaMix("q3_k_m", Q3_K)),
    "q4_k_s": Recipe(14, LlamaMix("q4_k_s", Q4_K)),
    "q4_k_m": Recipe(15, LlamaMix("q4_k_m", Q4_K)),
    "q5_k_m": Recipe(17, LlamaMix("q5_k_m", Q5_K)),
    "q6_k": Recipe(18, LlamaMix("q6_k", Q6_K)),
}


def recipe(out_type: str) -> Recipe:
    try:
        return RECIPES[out_type.lower()]
    except KeyError:
        raise ValueError(f"unknown output type {out_type!r} (choose from {', '.join(RECIPES)})") from None


def parse_tensor_types(specs: Sequence[str]) -> list[tuple[re.Pattern, GGMLType]]:
    """`PATTERN=TYPE` strings (llama-quantize --tensor-type) -> (regex, type), in the given order."""
    out = []
    for spec in specs:
        pattern, sep, type_name = spec.partition("=")
        if not sep or not pattern:
            raise ValueError(f"--tensor-type {spec!r}: expected PATTERN=TYPE, e.g. ffn_down=q6_k")
        try:
            out.append((re.compile(pattern), get(type_name).qtype))
        except re.error as e:
            raise ValueError(f"--tensor-type {spec!r}: bad regular expression: {e}") from None
        except ValueError as e:
            raise ValueError(f"--tensor-type {spec!r}: {e}") from None
    return out


def choose(rec: Recipe, tensors: Sequence[tuple[str, Shape]],
           overrides: Sequence[tuple[re.Pattern, GGMLType]] = ()) -> list[GGMLType]:  # fmt: skip
    """The storage type of each (name, shape). The first override whose regex is found in the name
    replaces the recipe's choice for any matrix the recipe would not keep F32 (llama-quantize's
    rule); short rows still fall back."""
    model = Model.of(tensors)
    types = []
    for name, shape in tensors:
        qtype = rec.pick(name, shape, model)
        match = next((t for rx, t in overrides if rx.search(name)), None)
        types.append(qtype if match is None or keeps_f32(name, shape) else fit(match, shape))
    return types
