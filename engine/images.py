"""From a generation's final latents to its result images: the VAE decode, one image at a time and whole or in
tiles, and each image encoded as its file."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from engine.request import GeneratedImage
from engine.runtime import release_freed_memory
from engine.tiling import decode_tiled
from engine.vocabulary import FORMAT_DETAILS, result_file_name


def decode_latents(
    decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, scaling_factor: float, *,
    tile: int | None, scale_factor: int,
) -> np.ndarray:
    """(B, 4, h, w) final latents -> (B, 3, H, W) images in about [-1, 1], `decode` run on one image (or tile) at
    a time.

    One image at a time: the VAE's mid-block attention over (H/8 * W/8)^2 scores takes gigabytes per image
    at 1024², and batching the decoder buys little on top of its convolutions.
    """
    scaled = (latents / np.float32(scaling_factor)).astype(np.float32)
    release_freed_memory()  # what the denoising loop freed, before the decoder's own peak
    if tile:
        images = [decode_tiled(scaled[i : i + 1], decode, tile=tile, scale_factor=scale_factor)
                  for i in range(len(scaled))]
    else:
        images = [decode(scaled[i : i + 1]) for i in range(len(scaled))]
    release_freed_memory()
    return np.concatenate(images)


def encode_image(pixels: np.ndarray, fmt: str, index: int) -> GeneratedImage:
    """(H, W, 3) uint8 pixels as the request's `index`-th image file in output format `fmt`."""
    content_type, pil_format, options, _ = FORMAT_DETAILS[fmt]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=pil_format, **options)
    return GeneratedImage(pixels=pixels, data=buf.getvalue(), content_type=content_type,
                          file_name=result_file_name(index, fmt))


def checked_vae_tile(tile: int | None, vae_scale: int) -> int | None:
    """A VAE tile size in pixels, or None: a positive multiple of 4 latent pixels."""
    if tile is not None and (tile <= 0 or tile % (4 * vae_scale)):
        raise ValueError(f"vae_tile: a positive multiple of {4 * vae_scale} pixels, not {tile}")
    return tile
