"""numba's thread count: one place that decides it, for the converter and the runtime.

numba's pool does the parallel work and BLAS runs in the calling thread. Two spinning pools on the
same cores fight: with OpenBLAS on 2 threads, a Q8_0 prefill matmat (11264x2048, T=48) that
alternates numba dequantization and BLAS took 170-720 ms on the 2-core dev machine, against 35 ms
with BLAS on 1 thread (OpenBLAS workers spin after each call, on the cores numba's workers need).
Prefill still multiplies on every core: each numba thread calls single-threaded cblas_sgemm on its
own tile (`sgemm()` finds it in the OpenBLAS numpy loaded).

numba's pool is TBB's when the `tbb` wheel is installed (a dependency on x86-64 Linux). On the shared
2-core dev machine (load average 6-7 from other jobs) one decoded token took 110-170 ms with TBB,
190 ms with numba's workqueue and 460-1180 ms with GNU OpenMP, whose fork-join barriers wait for
preempted workers; TBB is also safe for kernels launched from several threads (the converter's
read-ahead thread). The wheel puts libtbb in <prefix>/lib, off the loader's path, so it is loaded
here before numba looks for it; without it numba falls back to OpenMP.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

import numba

log = logging.getLogger(__name__)

# OpenBLAS thread setters: the plain name, and the prefixed ones of numpy's bundled scipy-openblas.
_BLAS_SETTERS = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
)


def _preload_tbb() -> None:
    for prefix in {sys.prefix, sys.base_prefix}:
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:  # a broken install: numba then uses OpenMP
                log.info("could not load %s: %s", path, e)
            return


_preload_tbb()


def default_threads() -> int:
    """Physical cores where psutil can tell, capped by what numba was started with."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, numba.config.NUMBA_NUM_THREADS))


def set_threads(n: int | None = None) -> int:
    """Set numba's thread count (None: the default) and BLAS's to one; returns the count in effect."""
    n = default_threads() if n is None else n
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)
    if not set_blas_threads(1):
        log.info("no OpenBLAS found in this process; BLAS threads left as configured")
    return n


def get_threads() -> int:
    return numba.get_num_threads()


# cblas_sgemm under the names OpenBLAS builds export it (numpy's bundled one is ILP64 and prefixed).
_SGEMM_NAMES = (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
                ("scipy_cblas_sgemm", ctypes.c_int), ("cblas_sgemm", ctypes.c_int))  # fmt: skip


@functools.cache
def sgemm():
    """cblas_sgemm of the OpenBLAS numpy uses, as a ctypes function numba kernels can call, or None.

    Arguments: order, transA, transB (int), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc."""
    for path in _loaded_libraries("openblas"):
        lib = ctypes.CDLL(path)
        for name, blasint in _SGEMM_NAMES:
            fn = getattr(lib, name, None)
            if fn is not None:
                i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
                fn.argtypes = [i, i, i, blasint, blasint, blasint, f, p, blasint, p, blasint, f, p, blasint]
                fn.restype = None
                return fn
    return None


def set_blas_threads(n: int) -> bool:
    """Set the thread count of every OpenBLAS loaded in this process; False if none was found."""
    found = False
    for path in _loaded_libraries("openblas"):
        lib = ctypes.CDLL(path)
        setter = next((getattr(lib, s) for s in _BLAS_SETTERS if hasattr(lib, s)), None)
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter(n)
            found = True
    return found


def _loaded_libraries(needle: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name contains needle."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux: nothing to find
        return []
    return sorted(p for p in paths if needle in os.path.basename(p).lower() and ".so" in p)
