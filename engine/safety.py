"""The safety checker at run time: CLIP preprocessing in numpy + Pillow, the exported graph, and flagged-image handling.

The preprocessing reproduces transformers' `CLIPImageProcessor` as it runs for uint8 images with the PIL backend
(`CLIPImageProcessorPil`, which is what `CLIPImageProcessor` resolves to when torchvision is not installed):
Pillow resize of each uint8 RGB image so the shortest edge matches, integer center crop (zero padding when the image
is smaller than the crop), `uint8 -> float64 * rescale_factor -> float32`, then `(x - mean) / std` in float32.
The same operations in the same order and precision give bit-identical results. With torchvision installed,
`CLIPImageProcessor` is the torchvision backend instead, which resizes with torch's own kernels: not compared here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from engine.runtime import Acceleration, create_session
from engine.vocabulary import FLAGGED_IMAGE_MODES as MODES


class SafetyChecker:
    """The exported StableDiffusionSafetyChecker: `check` flags images, `apply` replaces the flagged ones."""

    def __init__(self, session, preprocess: dict):
        self.session = session
        self.config = dict(preprocess)
        crop = self.config.get("crop_size") or {}
        size = int(self.config.get("image_size") or crop.get("height") or 224)
        self.image_size = size
        # Same dtype as transformers uses: mean/std are cast to the image's dtype (float32) before the arithmetic.
        self.mean = np.asarray(self.config.get("mean", [0.0, 0.0, 0.0]), dtype=np.float32)
        self.std = np.asarray(self.config.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)

    @classmethod
    def from_manifest(
        cls, export_dir: str | Path, entry: dict, providers: list[str] | tuple[str, ...] | None = None,
        intra_op_threads: int = 0, acceleration: Acceleration | None = None,
    ) -> SafetyChecker:
        session = create_session(Path(export_dir) / entry["file"], providers, intra_op_threads,
                                 graph="safety_checker", acceleration=acceleration)
        return cls(session, entry["preprocess"])

    # ---- preprocessing ----------------------------------------------------------------------------------------

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """(B,H,W,3) uint8 -> (B,3,S,S) float32, as CLIPImageProcessor (PIL backend) computes it."""
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
        return np.stack([self._one(image) for image in pixels]).astype(np.float32, copy=False)

    def _one(self, image: np.ndarray) -> np.ndarray:
        c = self.config
        if image.dtype != np.uint8:
            raise ValueError(f"safety checker: expected uint8 pixels, got {image.dtype}")
        if image.shape[-1] == 1:  # grey: what convert_to_rgb does to a one-channel array
            image = np.repeat(image, 3, axis=-1)
        if c.get("do_resize", True):
            h, w = self._resized_hw(*image.shape[:2])
            image = np.asarray(Image.fromarray(image).resize((w, h), resample=int(c.get("resample", 3))))
        if c.get("do_center_crop", True):
            crop = c["crop_size"]
            image = _center_crop(image, int(crop["height"]), int(crop["width"]))
        x = image
        if c.get("do_rescale", True):
            # float64 product then float32, as transformers does it: this order decides the last bit.
            x = (image.astype(np.float64) * float(c.get("rescale_factor", 1 / 255))).astype(np.float32)
        if c.get("do_normalize", True):
            x = (x.astype(np.float32, copy=False) - self.mean) / self.std
        return np.ascontiguousarray(np.moveaxis(x, -1, 0))

    def _resized_hw(self, height: int, width: int) -> tuple[int, int]:
        size = self.config.get("size") or {"shortest_edge": self.image_size}
        if "shortest_edge" in size:
            # transformers truncates the long edge (int(), not round()).
            short = int(size["shortest_edge"])
            if width <= height:
                return int(short * height / width), short
            return short, int(short * width / height)
        return int(size["height"]), int(size["width"])

    # ---- checking ---------------------------------------------------------------------------------------------

    def run(self, clip_input: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph on preprocessed input: concept scores (B,17), special-care scores (B,3), flags (B,) bool."""
        scores, special, flags = self.session.run(None, {"clip_input": np.asarray(clip_input, dtype=np.float32)})
        return scores, special, np.asarray(flags).astype(bool)

    def check(self, pixels: np.ndarray) -> list[bool]:
        """has_nsfw_concepts for each uint8 image (B,H,W,3)."""
        if len(pixels) == 0:
            return []
        _, _, flags = self.run(self.preprocess(pixels))
        return [bool(f) for f in flags]

    @staticmethod
    def apply(
        pixels: np.ndarray, flags: list[bool], mode: str = "black", blur_radius: float | None = None
    ) -> np.ndarray:
        """A copy of `pixels` (B,H,W,C uint8) with each flagged image blacked out (as diffusers does) or blurred.

        The blur is meant to make content unrecognisable: radius max(H,W)/8 unless `blur_radius` is given.
        """
        if mode not in MODES:
            raise ValueError(f"flagged image mode: one of {MODES}, not {mode!r}")
        out = np.array(pixels, copy=True)
        for i, flagged in enumerate(flags):
            if not flagged:
                continue
            if mode == "black":
                out[i] = 0
            else:
                radius = blur_radius if blur_radius is not None else max(out[i].shape[:2]) / 8
                out[i] = _blur(out[i], radius)
        return out


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (H,W,C) to the centre, rounding the offset down; zero-pad first where the image is smaller."""
    h, w = image.shape[:2]
    if h < height or w < width:
        ph, pw = max(height, h), max(width, w)
        padded = np.zeros((ph, pw) + image.shape[2:], dtype=image.dtype)
        top, left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
        padded[top : top + h, left : left + w] = image
        # transformers crops the padded image at the original offsets shifted by the padding.
        t, l_ = (h - height) // 2 + top, (w - width) // 2 + left
        return padded[max(0, t) : min(ph, t + height), max(0, l_) : min(pw, l_ + width)]
    top, left = (h - height) // 2, (w - width) // 2
    return image[top : top + height, left : left + width]


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    if image.ndim == 3 and image.shape[-1] == 1:
        return _blur(image[..., 0], radius)[..., None]
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
