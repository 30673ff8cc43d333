"""MLA latent cache: per layer, per token, the normalized latent c (C) then the rotated k_pe (R).

That is C + R numbers per token per layer (576 for V3) -- no per-head keys or values. The row
[c ; k_pe] is exactly the 'key' of the absorbed attention and c is its 'value' (deepseek-math.md §4.4).
"""

from __future__ import annotations

import numpy as np


class CacheFullError(ValueError):
    pass


class MLACache:
    """kv[layer]: float32 (capacity, C + R); rows [0, length) are filled.

    Capacity starts small and doubles up to n_ctx, so short chats do not pay for n_ctx up front.
    """

    def __init__(self, n_layer: int, kv_lora_rank: int, rope_dim: int, n_ctx: int, initial: int = 256):
        self.n_layer, self.C, self.R, self.n_ctx = n_layer, kv_lora_rank, rope_dim, n_ctx
        self.length = 0
        cap = max(1, min(initial, n_ctx))
        self.kv = [np.zeros((cap, self.width), dtype=np.float32) for _ in range(n_layer)]

    @property
    def width(self) -> int:
        return self.C + self.R

    @property
    def capacity(self) -> int:
        return self.kv[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv)

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more tokens (all layers); raise once n_ctx would be exceeded."""
        need = self.length + n_new
        if need > self.n_ctx:
            raise CacheFullError(f"context full: {need} tokens > n_ctx {self.n_ctx}")
        if need <= self.capacity:
            return
        cap = self.capacity
        while cap < need:
            cap *= 2
        cap = min(cap, self.n_ctx)
        for i, old in enumerate(self.kv):
            new = np.zeros((cap, self.width), dtype=np.float32)
            new[: self.length] = old[: self.length]
            self.kv[i] = new

    def write(self, layer: int, c: np.ndarray, k_pe: np.ndarray) -> np.ndarray:
        """Store c (T, C) and k_pe (T, R) at positions [length, length+T); return rows [0, length+T)."""
        t = c.shape[0]
        rows = self.kv[layer][self.length : self.length + t]
        rows[:, : self.C] = c
        rows[:, self.C :] = k_pe
        return self.kv[layer][: self.length + t]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (roll back a turn); later rows are overwritten by the next write."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n
