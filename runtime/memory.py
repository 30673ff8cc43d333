"""Memory probes: sizes written by people, what the process and the page cache hold, and how fast
memory and disk can be read.

RSS alone misses the point of `--max-ram`: file pages the kernel keeps cached are memory too, mapped
or not. `file_resident_bytes` asks mincore(2) which pages of a file are in the page cache (through a
fresh mapping that itself faults nothing in); `mapping_rss` reads /proc/self/smaps for the pages one
mapping of ours has touched.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

PAGE = mmap.PAGESIZE
# K/M/G/T and KiB.. are binary (as ulimit and docker read "1.5g"); KB/MB/GB/TB are decimal.
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'1.5G' -> 1610612736 bytes; a plain int is bytes."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = _SIZE.match(str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ValueError(f"bad size {text!r}: expected a number with K/M/G/T (binary) or KB/MB/GB/TB, e.g. 1.5G")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_size(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def process_memory() -> dict[str, int]:
    """Bytes from /proc/self/status: rss (VmRSS), rss_anon, rss_file, peak_rss (VmHWM)."""
    keys = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak_rss"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            out[keys[name]] = int(value.split()[0]) * 1024
    return out


def mapping_rss(arr: np.ndarray) -> int:
    """Bytes of the mapping that holds `arr` (a np.memmap) present in this process's page tables."""
    start = arr.__array_interface__["data"][0]
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # a mapping's header line: "lo-hi perms offset ..."
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= start < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no mapping holds this array")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def page_residency(path: str | Path) -> np.ndarray:
    """bool per page of the file: in the page cache now (anyone's), via mincore on a fresh map."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, dtype=bool)
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"{path}: mmap failed")
        try:
            vec = np.zeros(-(-size // PAGE), dtype=np.uint8)
            if _libc.mincore(addr, size, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"{path}: mincore failed")
        finally:
            _libc.munmap(addr, size)
    return (vec & 1).astype(bool)


def file_resident_bytes(path: str | Path, start: int = 0, stop: int | None = None) -> int:
    """Bytes of the file's pages [start, stop) held in the page cache."""
    pages = page_residency(path)
    return int(pages[start // PAGE : None if stop is None else -(-stop // PAGE)].sum()) * PAGE


def drop_file_cache(path: str | Path, start: int = 0, length: int = 0) -> None:
    """Ask the kernel to forget the file's cached pages (length 0: to the end). Pages some process
    has mapped stay; dirty ones are none of ours (the model file is read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@njit(cache=True, parallel=True, fastmath=True)
def _read_sum(a):
    # fastmath lets each thread's partial sum vectorize, so the loop runs at memory speed
    s = np.float32(0.0)
    for i in prange(a.size):
        s += a[i]
    return s


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Memory read GB/s: the fastest of `repeats` parallel sums over a fresh float32 array of `gib` GiB."""
    a = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    _read_sum(a[:1024])  # compile (or load from cache) outside the timing
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _read_sum(a)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def disk_read_speed(path: str | Path, want: int = 256 << 20, chunk: int = 16 << 20) -> float | None:
    """GB/s reading chunks of the file that are not in the page cache now (then dropped again, so
    the cache ends as it was). None when fewer than want/4 bytes are uncached: no honest number."""
    cold = page_residency(path)
    pages = chunk // PAGE
    starts = [i for i in range(len(cold) - pages, 0, -pages) if not cold[i : i + pages].any()]
    starts = starts[: want // chunk]
    if len(starts) * chunk < want // 4:
        return None
    buf = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is timed
        t0 = time.perf_counter()
        for p in starts:
            os.preadv(fd, [buf], p * PAGE)
        elapsed = time.perf_counter() - t0
        for p in starts:
            os.posix_fadvise(fd, p * PAGE, chunk, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return len(starts) * chunk / elapsed / 1e9


def mapped_pages(arr: np.ndarray) -> np.ndarray:
    """bool per page under arr's bytes: present in this process's page tables (bit 63 of
    /proc/self/pagemap), i.e. touched through this mapping (or mapped around a touch)."""
    addr = arr.__array_interface__["data"][0]
    first, end = addr // PAGE, -(-(addr + arr.nbytes) // PAGE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((end - first) * 8)
    return (np.frombuffer(raw, dtype=np.uint64) >> np.uint64(63)).astype(bool)
