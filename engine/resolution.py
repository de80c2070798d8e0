"""Resolution binning (docs/pixart-sigma.md §2.1): generate at the nearest trained aspect ratio, then resize and
crop back."""

from __future__ import annotations

import numpy as np


def classify_bin(height: int, width: int, bins: dict[str, list[int]]) -> tuple[int, int]:
    """(H, W) of the bin whose height/width ratio is nearest; ties go to the earlier key, as in diffusers."""
    ratio = height / width
    key = min(bins, key=lambda k: abs(float(k) - ratio))
    h, w = bins[key]
    return int(h), int(w)


def _bilinear_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Half-pixel centres, negative source positions clamped to 0: torch's bilinear with align_corners=False.
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = (src - i0).astype(np.float32)
    return i0, i1, frac


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C, height, width), no antialiasing."""
    _, _, h_in, w_in = images.shape
    y0, y1, fy = _bilinear_weights(h_in, height)
    x0, x1, fx = _bilinear_weights(w_in, width)
    rows = images[:, :, y0, :] * (1 - fy)[:, None] + images[:, :, y1, :] * fy[:, None]
    return rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx


def resize_and_crop(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale (B, C, H, W) to cover width x height, then centre-crop to exactly that size."""
    _, _, h, w = images.shape
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    # diffusers truncates h * ratio, which floating point can leave one pixel short of the side it was scaled to
    # cover (208 * (480 / 208) = 479.999...): its crop then starts at -1 and returns one row. Never below the target.
    rh, rw = max(height, int(h * ratio)), max(width, int(w * ratio))
    resized = resize_bilinear(images, rh, rw)
    top, left = (rh - height) // 2, (rw - width) // 2
    return resized[:, :, top : top + height, left : left + width]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) decoder output in about [-1, 1] -> (B, H, W, 3) uint8, rounding as diffusers' PIL path does."""
    x = np.clip(images * 0.5 + 0.5, 0.0, 1.0)
    return np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
