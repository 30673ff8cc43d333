"""`Tensor`: a typed, zero-copy view of stored weights, the unit `linear(x, w)` dispatches on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r1cpu.quant.registry import GGMLType, get

# numpy dtype of the element view for the plain float types; block types are viewed as bytes.
_ELEMENT_DTYPE = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.uint16}


@dataclass(frozen=True)
class Tensor:
    """shape is numpy order (GGUF ne reversed): linear weights (out, in), stacked experts (E, out, in).

    data is a view, never a copy:
      F32 float32[shape]; F16 float16[shape]; BF16 uint16[shape] (the high half of a float32);
      block types uint8[*shape[:-1], row_bytes] with row_bytes = shape[-1] / block_size * type_size.
    """

    name: str
    qtype: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray

    @classmethod
    def from_bytes(cls, name: str, qtype: GGMLType, shape: tuple[int, ...], raw: np.ndarray) -> "Tensor":
        """View a flat uint8 buffer (e.g. a memmap slice) as a tensor of this type and shape."""
        qtype = GGMLType(qtype)
        fmt = get(qtype)
        if qtype in _ELEMENT_DTYPE:
            data = raw.view(_ELEMENT_DTYPE[qtype]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], fmt.row_bytes(shape[-1]))
        return cls(name, qtype, tuple(shape), data)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __getitem__(self, index: int) -> "Tensor":
        """The slice along the first axis (one expert of a stacked tensor), still a view."""
        return Tensor(f"{self.name}[{index}]", self.qtype, self.shape[1:], self.data[index])
