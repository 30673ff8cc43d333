"""`linear(x, w)` and `embedding(w, ids)`: what layer code calls, whatever the storage type.

One table maps a storage type to its (matvec, matmat) pair; a new format plugs in with
`register_linear`, so layer code never branches on the type. Each kernel takes
(w: Tensor, x, out=None) and returns out; matvec gets x float32[D], matmat x float32[T, D].
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from r1cpu.kernels_numba import kquants, matmul
from r1cpu.quant.registry import GGMLType
from r1cpu.quant.tensor import Tensor

Kernel = Callable[[Tensor, np.ndarray, "np.ndarray | None"], np.ndarray]

_LINEAR: dict[GGMLType, tuple[Kernel, Kernel]] = {}


def register_linear(qtype: GGMLType, matvec: Kernel, matmat: Kernel) -> None:
    _LINEAR[GGMLType(qtype)] = (matvec, matmat)


matmul.CODECS.update(kquants.CODECS)  # Q2_K..Q6_K, Q5_0, Q5_1 (kernels_numba/kquants.py)
for _qtype in matmul.CODECS:
    register_linear(_qtype, matmul.matvec, matmul.matmat)


def linear(x: np.ndarray, w: Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """x float32[D] or [T, D] (C-contiguous) times w (out_features, D) transposed
    -> float32[out_features] or [T, out_features], written into `out` when given."""
    kernels = _LINEAR.get(w.qtype)
    if kernels is None:
        raise ValueError(f"{w.name}: no linear kernel for type {GGMLType(w.qtype).name}")
    if x.ndim not in (1, 2):
        raise ValueError(f"{w.name}: x must be [D] or [T, D], got shape {x.shape}")
    matvec, matmat = kernels
    return matvec(w, x, out) if x.ndim == 1 else matmat(w, x, out)


def embedding(w: Tensor, ids) -> np.ndarray:
    """float32[T, D]: rows `ids` (1-D token ids) of the (vocab, D) table w."""
    return matmul.dequantize_rows(w, ids)
