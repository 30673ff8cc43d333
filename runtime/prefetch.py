"""Prefetch of routed experts under `--max-ram`: a background thread reads the experts layer L+1
will likely need before the model asks for them.

The guess routes the residual stream through layer L+1's ffn_norm and router ahead of time, either
after layer L's attention (early: more time to read, but on the bench model only 64 % of the guesses
were right, 90 % of the best one) or after layer L's FFN (late: 85-88 % right). Decode only (one
token): a prompt batch routes to most experts anyway. How often the guesses were right is counted
per layer (ExpertCache counters predicted / predicted_right).

Default: the late guesses only. Interleaved on the bench model at --max-ram 1.5G (17/64 slots, a
0.5 GB/s disk, 2 busy cores), late guesses cut the model's wait on reads with no more disk bytes
than no prefetch (115-123 vs 122 MB/token); early ones read 10-30 % more bytes than they saved.
A fast disk with idle cores may prefer early=2 or 3 (Prefetcher's early/late counts).

Reads run outside the cache's lock while the model computes: preadv releases the GIL, and the
numba kernels leave it between calls.
"""

from __future__ import annotations

import queue
import threading
import weakref

import numpy as np

from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.expert_cache import ExpertCache, LayerCache
from r1cpu.runtime.moe import route
from r1cpu.runtime.norm import rmsnorm
from r1cpu.runtime.weights import ModelWeights, linear


class Prefetcher:
    """early / late: how many of the best guesses to read after layer L's attention and after its
    FFN (late None: all K)."""

    def __init__(self, weights: ModelWeights, cfg: ModelConfig, cache: ExpertCache, early: int = 0,
                 late: int | None = None):  # fmt: skip
        self.weights, self.cfg, self.cache = weights, cfg, cache
        self.take = {True: early, False: cfg.n_expert_used if late is None else late}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        thread = threading.Thread(target=_work, args=(self._jobs,), daemon=True, name="r1cpu-prefetch")
        thread.start()
        weakref.finalize(self, self._jobs.put, None)  # the thread ends with its Prefetcher

    def guess(self, layer: int, h: np.ndarray, early: bool) -> None:
        """h (T, D): the residual after `layer`'s attention (early) or FFN; queue reads for layer + 1."""
        nxt, n = self.cache.layers.get(layer + 1), self.take[early]
        if nxt is None or h.shape[0] != 1 or n == 0:
            return
        lw = self.weights.layers[layer + 1]
        x = rmsnorm(h, lw.ffn_norm, self.cfg.rms_eps)
        idx, _ = route(linear(x, lw.ffn.gate_inp), lw.ffn.probs_bias, self.cfg)
        best = idx[0, :n]  # route() orders each token's experts best first
        self._jobs.put((nxt, best, nxt.expect(best)))


def _work(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        layer_cache: LayerCache = job[0]
        try:
            layer_cache.prefetch(job[1], job[2])
        except OSError:
            pass  # the slot was freed; the model reads that expert itself and reports the error
