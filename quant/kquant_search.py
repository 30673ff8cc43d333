"""The scale searches behind ggml's k-quant reference quantizers (`quantize_row_q*_K_ref`), in numpy.

Each search runs on many sub-blocks at once: `x` is f32[m, n], m sub-blocks of n weights, and every
result is per row. The arithmetic is float32 operation for operation as in the C reference, so the
bytes come out equal to ggml's:
  * sums run left to right (`seq_sum`); np.sum adds pairwise and would round differently;
  * quant levels are kept as float32 integers, because C converts its int levels to float before
    multiplying;
  * `nearest_int` in C adds 1.5 * 2^23 and reads the mantissa: round half to even, i.e. np.rint.

    make_qkx2_quants  affine (scale, min) fit for Q2_K / Q4_K / Q5_K: a sweep of candidate scales,
                      each refined by weighted least squares, keeping the lowest weighted error
    make_qx_quants    symmetric scale for Q6_K (rmse_type 1: weights x^2), 19 candidate scales
    make_q3_quants    symmetric scale for Q3_K, then up to 5 greedy passes moving single levels
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml: a group whose |x| stays below this is stored as zeros


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis, left to right in float32, as a C `for` loop adds."""
    return np.cumsum(a, axis=-1, dtype=np.float32)[..., -1]


def levels(iscale: np.ndarray, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """clamp(nearest_int(iscale * x), lo, hi) per row, as float32 integers."""
    return np.clip(np.rint(iscale[:, None] * x), F32(lo), F32(hi))


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the value of largest |x|, the first one on ties (C's strict `>` scan)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _weighted_error(w, x, L, scale, mn, use_mad: bool) -> np.ndarray:
    diff = scale[:, None] * L + mn[:, None] - x
    return seq_sum(w * (np.abs(diff) if use_mad else diff * diff))


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """Fit x ~ scale * L - the_min, L in [0, nmax], minimizing sum w * |err| (use_mad) or w * err^2.

    Returns (scale f32[m], the_min f32[m] >= 0, L f32[m, n]). The offset is clamped to <= 0 (the
    min is stored unsigned), and a flat row gets scale 0 and L = 0.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _qkx2(x, w, F32(nmax), F32(rmin), F32(rdelta), nstep, use_mad)


def _qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    mn = np.minimum(x.min(axis=1), F32(0))
    mx = x.max(axis=1)
    flat = mx == mn
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    iscale = nmax / (mx - mn)
    L = levels(iscale, x - mn[:, None], 0, int(nmax))
    scale = F32(1) / iscale
    best = _weighted_error(w, x, L, scale, mn, use_mad)
    for step in range(nstep + 1):
        # the span uses the current best min, which earlier steps may have moved (as in C)
        iscale = (rmin + rdelta * F32(step) + nmax) / (mx - mn)
        La = levels(iscale, x - mn[:, None], 0, int(nmax))
        wl = w * La
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * La), seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # a positive offset cannot be stored: refit the scale alone
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, F32(0), this_min)
        err = _weighted_error(w, x, La, this_scale, this_min, use_mad)
        better = (D > 0) & (err < best) & ~flat
        L[better], best[better] = La[better], err[better]
        scale[better], mn[better] = this_scale[better], this_min[better]
    scale[flat], L[flat] = F32(0), F32(0)
    return scale, -mn, L


def make_qx_quants(x: np.ndarray, nmax: int):
    """Symmetric x ~ scale * (L - nmax), L in [0, 2 nmax), weights x^2 (ggml rmse_type 1).

    Returns (scale f32[m], L f32[m, n]); a row below GROUP_MAX_EPS gets scale 0 and L = 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _qx(x, F32(nmax))


def _qx(x, nmax):
    mx = signed_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    wx, w = x * x * x, x * x  # w * x with w = x * x, associated as C's w*x[i]*l

    def attempt(iscale):
        lv = levels(iscale, x, -int(nmax), int(nmax) - 1)
        return lv, seq_sum(wx * lv), seq_sum(w * lv * lv)

    L, sumlx, suml2 = attempt(-nmax / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        lv, sumlx, suml2 = attempt(-(nmax + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L[better], scale[better] = lv[better], sumlx[better] / suml2[better]
        best[better] = scale[better] * sumlx[better]
    L += nmax
    scale[zero], L[zero] = F32(0), F32(0)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int):
    """Symmetric x ~ scale * (L - nmax), L in [0, 2 nmax), weights x^2, then greedy level moves.

    Returns (scale f32[m], L f32[m, n]); a row below GROUP_MAX_EPS gets scale 0 and L = 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _q3(x, F32(nmax))


def _q3(x, nmax):
    mx = signed_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    L = levels(-nmax / mx, x, -int(nmax), int(nmax) - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = seq_sum(wx * L), seq_sum(w * L * L)
    active = ~zero
    for _ in range(5):
        changed = np.zeros_like(active)
        for i in range(x.shape[1]):
            xi, wi, wxi, li = x[:, i], w[:, i], wx[:, i], L[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = np.clip(np.rint(xi * sl2 / slx), -nmax, nmax - F32(1))
            slx_new, sl2_new = slx + wxi * new, sl2 + wi * new * new
            accept = active & (slx > 0) & (new != li) & (sl2_new > 0)
            accept &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
            L[accept, i] = new[accept]
            sumlx, suml2 = np.where(accept, slx_new, sumlx), np.where(accept, sl2_new, suml2)
            changed |= accept
        active &= changed  # C stops a group after a pass that changed nothing
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L += nmax
    scale[zero], L[zero] = F32(0), F32(0)
    return scale, L
