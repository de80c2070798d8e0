"""PixArt's 2-D sin-cos positional embedding, computed on the host and fed to the transformer graph.

The grid is stretched to the base extent rather than extrapolated: `pos = arange(n) / (n / base_size) / scale`
on each axis, so every bin spans [0, base_size / scale). The first half of the channels encodes the column (x),
the second half the row (y), each as [sin | cos] over frequencies 10000^(-k / (dim/4)). Computed in float64 as
diffusers does, then cast to float32.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(pos, omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@lru_cache(maxsize=64)
def sincos_pos_embed(dim: int, rows: int, cols: int, base_size: float, interpolation_scale: float) -> np.ndarray:
    """(1, rows * cols, dim) float32 embedding for a token grid of rows x cols, row-major (row outer)."""
    if dim % 4:
        raise ValueError(f"embedding width must be divisible by 4, got {dim}")
    y = np.arange(rows, dtype=np.float64) / (rows / base_size) / interpolation_scale
    x = np.arange(cols, dtype=np.float64) / (cols / base_size) / interpolation_scale
    xx, yy = np.meshgrid(x, y)  # (rows, cols) each
    emb = np.concatenate([_sincos_1d(dim // 2, xx.reshape(-1)), _sincos_1d(dim // 2, yy.reshape(-1))], axis=1)
    out = emb.astype(np.float32)[None]
    out.flags.writeable = False  # cached and shared between calls
    return out
