"""token_tiles.py: Q4_0 rows times 8-token tiles of 8-bit activations (prefill), against the row
products of intrinsics.py (checked in test_fast_kernels.py against float64 references)."""

import numpy as np
import pytest
from numba import njit

from r1cpu.kernels_numba import actquant, qlinear, token_tiles
from r1cpu.kernels_numba.intrinsics import KIND_Q4_0
from r1cpu.quant import registry
from r1cpu.quant.registry import GGMLType


def q4_0_rows(rows, cols, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return registry.quantize(w, GGMLType.Q4_0).reshape(rows, -1)


def row_products(w, x):
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    return qlinear.matvec(out, w, KIND_Q4_0, actquant.quantize(x))


def test_tile_layout():
    # at[t, b, g, 4j + k] = q[8t + j, 32b + 4g + k]; ad the block scales; ao Q4_0's offset; padding zero
    x = np.random.default_rng(1).standard_normal((11, 64)).astype(np.float32)
    at, ad, ao = token_tiles.quantize(x)
    act = actquant.quantize(x)
    q = np.zeros((16, 64), np.int8)
    q[:11] = act.q
    want = q.reshape(2, 8, 2, 8, 4).transpose(0, 2, 3, 1, 4).reshape(at.shape)
    assert np.array_equal(at, want)
    assert np.array_equal(ad[:, :, :].transpose(0, 2, 1).reshape(16, 2)[:11], act.d) and not ad.reshape(-1)[-1]
    offsets = -8 * act.q.reshape(11, 2, 32).sum(-1, dtype=np.int32)
    assert np.array_equal(ao.transpose(0, 2, 1).reshape(16, 2)[:11], offsets)


@pytest.mark.parametrize("T", [1, 8, 9, 17, 137])  # one tile, a pair, pair + single, chunks of tiles
def test_matmat_matches_row_products(T):
    w = q4_0_rows(40, 96)
    x = np.random.default_rng(T).standard_normal((T, 96)).astype(np.float32)
    out = token_tiles.matmat(np.full((T, 40), np.nan, np.float32), w, x)
    want = row_products(w, x)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6 * np.abs(want).max())


@njit(cache=True)
def _both(w, at, ad, ao, n_tiles):
    nb = at.shape[1]
    fast, slow = np.empty((w.shape[0], 8 * n_tiles), np.float32), np.empty((w.shape[0], 8 * n_tiles), np.float32)
    for r in range(w.shape[0]):
        token_tiles._tile_dot(w, r * w.shape[1], at, ad, ao, 0, nb, fast[r], n_tiles)
        token_tiles._tile_dot_generic(w, r * w.shape[1], at, ad, ao, 0, nb, slow[r], n_tiles)
    return fast, slow


@pytest.mark.parametrize("n_tiles", [1, 2])
def test_portable_tile_dot_matches(n_tiles):
    # the loops CPUs without AVX2 run give the vector kernel's sums
    w = q4_0_rows(5, 64, seed=3)
    at, ad, ao = token_tiles.quantize(np.random.default_rng(4).standard_normal((16, 64)).astype(np.float32))
    fast, slow = _both(w, at, ad, ao, n_tiles)
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6 * np.abs(slow).max())


def test_matmat_rejects_a_mismatch():
    with pytest.raises(ValueError, match="do not fit"):
        token_tiles.matmat(np.empty((2, 3), np.float32), q4_0_rows(3, 64), np.zeros((2, 96), np.float32))
