"""numba's thread count: one place that decides it, for the converter and the runtime."""

from __future__ import annotations

import os

import numba


def default_threads() -> int:
    """Physical cores where psutil can tell, capped by what numba was started with."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, numba.config.NUMBA_NUM_THREADS))


def set_threads(n: int | None = None) -> int:
    """Set numba's thread count (None: the default); returns the count in effect."""
    n = default_threads() if n is None else n
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)
    return n
