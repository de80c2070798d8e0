"""Comparing the pictures two sides made from the same inputs."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) of two uint8 images over their luma, with a uniform `window`-pixel window and
    the paper's constants."""
    def luma(image: np.ndarray) -> np.ndarray:
        image = image.astype(np.float64)
        return image @ np.array([0.299, 0.587, 0.114]) if image.ndim == 3 else image

    def local_mean(image: np.ndarray) -> np.ndarray:
        view = np.lib.stride_tricks.sliding_window_view(image, (window, window))
        return view.mean(axis=(-1, -2))

    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = local_mean(x), local_mean(y)
    vx, vy = local_mean(x * x) - mx * mx, local_mean(y * y) - my * my
    cov = local_mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
