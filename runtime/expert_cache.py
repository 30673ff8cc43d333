"""Routed experts on demand under a RAM budget (`--max-ram`).

The budget holds the resident weights (every tensor but the routed experts, read through the map
as without a budget) and an expert cache that gives every MoE layer the same number of slots S.
Slot s of layer L holds one expert's gate, up and down slices in per-layer pools (S, rows,
row_bytes), which is what MoEWeights.resolve hands to the MoE code. A miss reads the expert with
one preadv per contiguous file range straight into its slot and then drops those file pages from
the page cache (POSIX_FADV_DONTNEED): the slot is the only copy kept, so the process plus the file
pages it leaves behind stay within the budget. Routed experts are never touched through the map.

Eviction takes the resident expert with the lowest score among the slots not needed now:
    lru    last use
    lfu    routing count since load (kept across evictions, so a hot expert wins back its place)
    lrfu   count decayed by half every `half_life` uses of the layer (between the two)
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from r1cpu.quant.tensor import Tensor
from r1cpu.runtime.config import ModelConfig
from r1cpu.runtime.gguf_reader import GGUFFile
from r1cpu.runtime.memory import PAGE, fmt_size
from r1cpu.runtime.weights import DenseWeights, MoEWeights, ModelWeights

# Half-life in uses of the layer. On 1024 tokens of tools/data/eval-text.txt through the bench model
# (17 of 64 slots, one call per token) LRU hit 51 %, LRFU 16: 61 %, LRFU 64: 62 %, LFU 62 %, the
# offline optimum 72 %: routing frequency pays. LRFU 64 is the default: LFU's hits, while a change of
# topic still ages old favourites out.
POLICIES = {"lru": 0.0, "lfu": math.inf, "lrfu": 64.0}
DEFAULT_POLICY = "lrfu"
EXPERT_TENSOR = re.compile(r"\.ffn_(gate|up|down|gate_up)_exps\.")
# hits/misses: experts the model asked for; read_s: seconds the model waited on those reads;
# prefetch_used: prefetched experts the model then asked for; predicted_right of predicted.
COUNTERS = ("hits", "misses", "read_s", "disk_bytes", "disk_reads", "prefetch_loads", "prefetch_used",
            "predicted", "predicted_right")  # fmt: skip


class SlotTable:
    """Which expert each slot holds, and the policy's bookkeeping. No I/O, no locks: the owner
    serialises calls (and the policy simulator in tests/benchmarks drives it directly)."""

    def __init__(self, n_expert: int, n_slots: int, half_life: float):
        self.slot_of = np.full(n_expert, -1, dtype=np.int64)  # (E,) slot or -1
        self.holder = np.full(n_slots, -1, dtype=np.int64)  # (S,) expert or -1 (free)
        self.last = np.zeros(n_expert)  # (E,) tick of the last use
        self.weight = np.zeros(n_expert)  # (E,) use count, decayed to `last`
        self.half_life, self.now = half_life, 0

    def _decayed(self, experts: np.ndarray) -> np.ndarray:
        if self.half_life == 0:
            return np.zeros(len(experts))
        return self.weight[experts] * 0.5 ** ((self.now - self.last[experts]) / self.half_life)

    def use(self, ids: np.ndarray) -> None:
        """The model routes to `ids` now (one tick per call)."""
        self.now += 1
        self.weight[ids] = self._decayed(ids) + 1.0
        self.last[ids] = self.now

    def place(self, e: int, keep: set[int]) -> int | None:
        """A slot for expert e (not resident): a free one, else the lowest score outside `keep`
        (the decayed count; the older last use on ties, which is all LRU looks at)."""
        free = np.flatnonzero(self.holder < 0)
        if free.size:
            s = int(free[0])
        else:
            cand = np.ones(self.holder.size, dtype=bool)
            cand[list(keep)] = False
            cand = np.flatnonzero(cand)
            if cand.size == 0:
                return None
            held = self.holder[cand]
            s = int(cand[np.lexsort((self.last[held], self._decayed(held)))[0]])
            self.slot_of[self.holder[s]] = -1
        self.holder[s], self.slot_of[e] = e, s
        return s

    def admit(self, ids: np.ndarray, busy: set[int] = frozenset()) -> tuple[np.ndarray, list[tuple[int, int]]]:  # fmt: skip
        """A model call routed to `ids` (at most n_slots distinct): which were resident, and the
        (expert, slot) pairs to load, victims taken outside the ids' own slots and `busy` ones."""
        self.use(ids)
        hit = self.slot_of[ids] >= 0
        keep = set(self.slot_of[ids[hit]].tolist()) | busy
        loads = []
        for e in ids[~hit]:
            s = self.place(int(e), keep)
            keep.add(s)
            loads.append((int(e), s))
        return hit, loads

    def forget(self, s: int) -> None:
        """Free slot s (its read failed)."""
        if self.holder[s] >= 0:
            self.slot_of[self.holder[s]] = -1
        self.holder[s] = -1


class FileReader:
    """Large positioned reads into caller buffers, the page-cache copy dropped right after.

    `mapping` (the model's mmap.mmap of the same file): the kernel may map cached pages next to a
    touched one (fault-around), and pages mapped by us stay cached whatever fadvise says, so the
    expert's whole pages are unmapped too before they are dropped."""

    def __init__(self, path, mapping: mmap.mmap | None = None):
        self.path, self.mapping = path, mapping
        self.fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead beyond what we ask
        weakref.finalize(self, os.close, self.fd)

    def read(self, bufs: list[memoryview], offset: int) -> int:
        """Fill bufs from offset on (one preadv, repeated only after a short read); returns bytes."""
        total, done = sum(b.nbytes for b in bufs), 0
        while done < total:
            n = _preadv(self.fd, _skip(bufs, done), offset + done)
            if n <= 0:
                raise OSError(f"{self.path}: read of {total} bytes at offset {offset} stopped after {done}")
            done += n
        inner_lo, inner_hi = -(-offset // PAGE) * PAGE, (offset + total) // PAGE * PAGE
        if self.mapping is not None and inner_hi > inner_lo:  # pages holding nothing but this expert
            self.mapping.madvise(mmap.MADV_DONTNEED, inner_lo, inner_hi - inner_lo)
        # Whole pages around the range: neighbours are other experts (ours only in slots) or tensors
        # we keep mapped, whose mapped pages the kernel does not drop.
        lo = offset // PAGE * PAGE
        os.posix_fadvise(self.fd, lo, offset + total - lo, os.POSIX_FADV_DONTNEED)
        return total

    def drop(self, start: int, length: int) -> None:
        """Forget cached pages of [start, start + length) that nobody maps."""
        os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)


def _preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
    return os.preadv(fd, bufs, offset)  # a module function, so tests can watch every read


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for b in bufs:
        if n >= b.nbytes:
            n -= b.nbytes
        else:
            out.append(b[n:])
            n = 0
    return out


@dataclass(frozen=True)
class Budget:
    max_ram: int
    resident: int  # bytes of every tensor but the routed experts
    expert_bytes: int  # one expert of every MoE layer together (a slot across all layers)
    n_slots: int  # S per MoE layer
    n_expert: int

    @property
    def cache_bytes(self) -> int:
        return self.n_slots * self.expert_bytes


def split_budget(gguf: GGUFFile, cfg: ModelConfig, weights: ModelWeights, max_ram: int) -> Budget:
    """Slots per layer that the budget leaves after the resident weights; a one-line error when
    they are fewer than the experts one token uses."""
    resident = sum(t.nbytes for name, t in gguf.tensors.items() if not EXPERT_TENSOR.search(name))
    expert_bytes = sum(lw.ffn.expert_nbytes(0) for lw in weights.layers if isinstance(lw.ffn, MoEWeights))
    if expert_bytes == 0:
        n_slots = 0
    else:
        n_slots = min(cfg.n_expert, max(0, max_ram - resident) // expert_bytes)
    need = resident + cfg.n_expert_used * expert_bytes
    if max_ram < resident or (expert_bytes and n_slots < cfg.n_expert_used):
        raise ValueError(
            f"--max-ram {fmt_size(max_ram)} is too small for {gguf.path.name}: the resident weights take "
            f"{fmt_size(resident)} and each MoE layer needs room for {cfg.n_expert_used} experts "
            f"({fmt_size(cfg.n_expert_used * expert_bytes)} in all); use at least {fmt_size(need)}"
        )
    return Budget(max_ram, resident, expert_bytes, int(n_slots), cfg.n_expert)


def _file_span(base: int, t: Tensor) -> tuple[int, int, int]:
    """(file offset of expert 0's slice, stride between experts, bytes of one slice)."""
    first, one = t.data[0], t.data[0].nbytes
    if not first.flags.c_contiguous:
        raise ValueError(f"{t.name}: an expert's slice is not contiguous in the file")
    stride = t.data.strides[0]
    return first.__array_interface__["data"][0] - base, stride, one


class LayerCache:
    """One MoE layer's slots: what MoEWeights.store points at (resolve, views, n_slots)."""

    def __init__(self, owner: "ExpertCache", layer: int, w: MoEWeights, n_slots: int):
        self.owner, self.layer, self.n_slots = owner, layer, n_slots
        kinds = (w.gate_exps, w.up_exps, w.down_exps)
        # np.empty: pages are taken as slots fill, so resident memory tracks what was loaded.
        self.pools = tuple(np.empty((n_slots,) + t.data.shape[1:], dtype=t.data.dtype) for t in kinds)
        self.views = tuple(
            DenseWeights(*(Tensor(f"{t.name}[slot {s}]", t.qtype, t.shape[1:], p[s]) for t, p in zip(kinds, self.pools)))
            for s in range(n_slots)
        )  # fmt: skip
        base = owner.gguf.mmap.__array_interface__["data"][0]
        self.spans = [_file_span(base, t) for t in kinds]
        self.n_expert = len(w.experts)
        self.table = SlotTable(len(w.experts), n_slots, owner.half_life)
        self.lock = threading.Lock()
        self.epoch = 0  # resolves so far: a prefetch asked for before the latest one is stale
        self.pinned: set[int] = set()  # slots of the latest resolve, in use until the next layer's
        self.prefetched = np.zeros(n_slots, dtype=bool)  # loaded by prefetch, not used yet
        self.predicted: np.ndarray | None = None
        self.loading: dict[int, threading.Event] = {}  # slot -> set once its read is over
        self.counts = owner.counts[layer]

    def resolve(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if len(ids) > self.n_slots:
            raise ValueError(f"layer {self.layer}: {len(ids)} experts asked for at once, {self.n_slots} slots")
        t0 = time.perf_counter()
        while (claim := self._claim(ids)) is None:
            pass
        slots, loads, pending = claim
        self._read_all(loads)  # outside the lock: a prefetch read can run alongside
        for done in pending:
            done.wait()
        self._drop_strays()
        self.counts["read_s"] += time.perf_counter() - t0  # only this thread writes it
        if (self.table.slot_of[ids] != slots).any():  # a prefetch read failed: read them here
            return self.resolve(ids)
        return (*self.pools, slots)

    def _claim(self, ids: np.ndarray):
        """Under the lock: the slots of ids, the (expert, slot) reads this call must make, and the
        prefetch reads of its experts still running. None after waiting for prefetch reads that
        held the slots this call needs."""
        with self.lock:
            busy = set(self.loading) - set(self.table.slot_of[ids].tolist())
            if len(ids) + len(busy) > self.n_slots:
                waits = [self.loading[s] for s in busy]
            else:
                self.epoch += 1
                self.owner.current = self.layer
                self._score_prediction(ids)
                held = self.table.slot_of[ids]
                hit, loads = self.table.admit(ids, busy)
                self.counts["hits"] += int(hit.sum())
                self.counts["misses"] += len(loads)
                self.counts["prefetch_used"] += int(self.prefetched[held[hit]].sum())
                slots = self.table.slot_of[ids]
                self.prefetched[slots] = False
                self.pinned = set(slots.tolist())
                self._start(loads)
                return slots, loads, [self.loading[s] for s in held[hit] if s in self.loading]
        for done in waits:
            done.wait()
        return None

    def expect(self, ids: np.ndarray) -> int:
        """Add guesses for the next resolve; returns the epoch a prefetch must still see."""
        with self.lock:
            ids = np.asarray(ids, dtype=np.int64)
            self.predicted = ids if self.predicted is None else np.union1d(self.predicted, ids)
            return self.epoch

    def prefetch(self, ids: np.ndarray, epoch: int) -> None:
        """Load predicted experts one at a time, giving up once the model has resolved this layer."""
        for e in ids:
            with self.lock:
                if self.epoch != epoch:
                    return
                if self.table.slot_of[e] >= 0:
                    continue
                keep = {int(s) for s in self.table.slot_of[ids] if s >= 0} | set(self.loading)
                if self.owner.current == self.layer:  # the model may be computing with these
                    keep |= self.pinned
                s = self.table.place(int(e), keep)
                if s is None:
                    return
                self.prefetched[s] = True
                self.counts["prefetch_loads"] += 1
                self._start([(int(e), s)])
            self._read_all([(int(e), s)])

    def _score_prediction(self, ids: np.ndarray) -> None:
        if self.predicted is not None:
            self.counts["predicted"] += len(ids)
            self.counts["predicted_right"] += int(np.isin(ids, self.predicted).sum())
            self.predicted = None

    def _drop_strays(self) -> None:
        """Page faults on resident tensors read around them (read_ahead_kb, often MBs) and so cache
        pages of neighbouring experts that no read of ours asked for: drop this layer's expert
        tensors from the page cache each time it runs (a few syscalls over mostly empty ranges)."""
        for offset, stride, size in self.spans:
            self.owner.reader.drop(offset, stride * (self.n_expert - 1) + size)

    def _start(self, loads: list[tuple[int, int]]) -> None:
        """Mark the slots being filled (under the lock): no one evicts them, and whoever needs
        their expert waits for the event."""
        for _, s in loads:
            self.loading[s] = threading.Event()

    def _read_all(self, loads: list[tuple[int, int]]) -> None:
        """Each (expert, slot): the expert's three slices from the file into the slot. Runs without
        the lock; the table is updated under it once the reads are over."""
        done = nbytes = reads = 0
        try:
            for e, s in loads:
                parts = [(off + e * stride, memoryview(pool[s]).cast("B"))
                         for (off, stride, _), pool in zip(self.spans, self.pools)]  # fmt: skip
                for offset, bufs in _runs(sorted(parts, key=lambda p: p[0])):
                    nbytes, reads = nbytes + self.owner.reader.read(bufs, offset), reads + 1
                done += 1
        finally:
            with self.lock:
                self.counts["disk_bytes"] += nbytes
                self.counts["disk_reads"] += reads
                for i, (_, s) in enumerate(loads):
                    if i >= done:  # without (all of) its expert: never hand it out
                        self.table.forget(s)
                    self.loading.pop(s).set()


def _runs(parts: list[tuple[int, memoryview]]) -> list[tuple[int, list[memoryview]]]:
    """Sorted (offset, buffer) pairs -> one (offset, buffers) per contiguous file range (the fused
    gate_up layout keeps an expert's gate and up rows together: one read fills both)."""
    runs: list[tuple[int, list[memoryview]]] = []
    end = None
    for offset, buf in parts:
        if offset == end:
            runs[-1][1].append(buf)
        else:
            runs.append((offset, [buf]))
        end = offset + buf.nbytes
    return runs


class ExpertCache:
    """The expert slots of every MoE layer under one budget, with their read and hit counters."""

    def __init__(self, gguf: GGUFFile, cfg: ModelConfig, weights: ModelWeights, max_ram: int,
                 policy: str = DEFAULT_POLICY):  # fmt: skip
        if policy not in POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r} (choose from {', '.join(POLICIES)})")
        self.gguf, self.policy, self.half_life = gguf, policy, POLICIES[policy]
        self.budget = split_budget(gguf, cfg, weights, max_ram)
        self.reader = FileReader(gguf.path, getattr(gguf.mmap, "_mmap", None))  # numpy's mmap.mmap
        self.counts = {i: dict.fromkeys(COUNTERS, 0) for i in range(cfg.n_layer)}
        self.current = -1  # the MoE layer the model resolved last
        self.layers = {
            i: LayerCache(self, i, lw.ffn, self.budget.n_slots)
            for i, lw in enumerate(weights.layers)
            if isinstance(lw.ffn, MoEWeights)
        }

    def attach(self, weights: ModelWeights) -> ModelWeights:
        """The same weights with every MoE layer's experts behind this cache."""
        layers = [
            dataclasses.replace(lw, ffn=dataclasses.replace(lw.ffn, store=self.layers[i])) if i in self.layers else lw
            for i, lw in enumerate(weights.layers)
        ]
        return dataclasses.replace(weights, layers=layers)

    def totals(self) -> dict[str, int]:
        """Counters summed over layers since load (callers diff two calls for per-token figures)."""
        return {k: sum(c[k] for c in self.counts.values()) for k in COUNTERS}

    def resident_experts(self) -> int:
        return sum(int((lc.table.holder >= 0).sum()) for lc in self.layers.values())

    def summary(self, since: dict[str, int] | None = None, tokens: int = 0) -> str:
        t = self.totals()
        if since:
            t = {k: t[k] - since.get(k, 0) for k in t}
        asked, b = t["hits"] + t["misses"], self.budget
        n = max(tokens, 1)
        per = f", {t['misses'] / n:.1f} misses and {t['disk_bytes'] / n / 1e6:.1f} MB read per token" if tokens else ""
        guess = f", prediction right {t['predicted_right'] / t['predicted']:.0%}" if t["predicted"] else ""
        return (f"experts: {t['hits'] / max(asked, 1):.0%} hits ({t['hits']}/{asked}){per}, "
                f"{fmt_size(t['disk_bytes'])} from disk, {t['prefetch_loads']} prefetched "
                f"({t['prefetch_used']} used){guess} | cache {b.n_slots}/{b.n_expert} slots per layer, "
                f"{fmt_size(b.cache_bytes)}, resident weights {fmt_size(b.resident)}, "
                f"budget {fmt_size(b.max_ram)} ({self.policy})")  # fmt: skip


def simulate(trace, n_expert: int, n_slots: int, policy: str) -> tuple[int, int]:
    """(hits, asked) of one layer's cache on a routing trace (an id array per model call), counted
    as LayerCache.resolve counts them without prefetch: for comparing policies offline."""
    table = SlotTable(n_expert, n_slots, POLICIES[policy])
    hits = asked = 0
    for ids in trace:
        used = np.unique(ids)
        for start in range(0, used.size, n_slots):  # in turns, as moe() asks
            hit, _ = table.admit(used[start : start + n_slots])
            hits, asked = hits + int(hit.sum()), asked + hit.size
    return hits, asked
