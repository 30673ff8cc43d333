"""DeepSeek-V3/R1 FP8 weights: float8_e4m3fn codes with one float32 `weight_scale_inv` per 128x128 tile.

    code  | s | e e e e | m m m |      e == 0:  (m / 8) * 2^-6       (subnormal)
            7   6 ... 3   2 . 0       e  > 0:  (1 + m / 8) * 2^(e - 7)
                                      0x7F, 0xFF: NaN (e4m3fn has no infinities; max is 448)

    W[i, j] = float32(code[i, j]) * scale_inv[i // 128, j // 128]      (one float32 product)
Tiles at the right and bottom edges may be partial, so scale_inv is [ceil(rows/128), ceil(cols/128)].
"""

from __future__ import annotations

import numpy as np

BLOCK = (128, 128)


def _e4m3_table() -> np.ndarray:
    b = np.arange(256)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    mag[(b & 0x7F) == 0x7F] = np.nan
    return np.where(b & 0x80, -mag, mag).astype(np.float32)


E4M3_TABLE = _e4m3_table()  # float32[256], indexed by the raw code byte


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def check_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = BLOCK) -> None:
    """Raise unless w is uint8[rows, cols] and scale_inv is float32 with one entry per tile."""
    if w.dtype != np.uint8 or w.ndim != 2:
        raise TypeError(f"fp8 weight must be uint8[rows, cols], got {w.dtype}{list(w.shape)}")
    expected = scale_shape(w.shape, block)
    if scale_inv.dtype != np.float32 or scale_inv.shape != expected:
        raise ValueError(
            f"scale_inv for a {w.shape} weight in {block} tiles must be float32{expected}, "
            f"got {scale_inv.dtype}{scale_inv.shape}"
        )


def dequantize_fp8(
    w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = BLOCK, rows: slice = slice(None)
) -> np.ndarray:
    """uint8[R, C] fp8 codes -> float32[len(rows), C]; only the selected rows of w are read."""
    check_fp8(w, scale_inv, block)
    r = np.arange(w.shape[0])[rows]  # global row numbers pick the scale row
    c = np.arange(w.shape[1])
    scale = scale_inv[(r // block[0])[:, None], (c // block[1])[None, :]]
    return E4M3_TABLE[w[rows]] * scale
