"""Tiled VAE decoding: bounded decoder memory for large images.

The decoder's peak activation memory grows with the image, and its mid-block attention with the square of the
pixel count, so a large latent is decoded as overlapping tiles of at most `tile` pixels a side. Tile placement,
per-tile decoding (post_quant_conv included), blending and cropping follow diffusers' `AutoencoderKL.tiled_decode`,
in float32, so the two agree to float rounding; seams are blended linearly over `overlap` of a tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Layout:
    tile_latent: int  # tile side in latent cells
    step: int  # latent distance between tile origins
    blend: int  # pixels of each seam that are cross-faded
    keep: int  # pixels each tile contributes to the output, per side


def _layout(tile: int, scale_factor: int, overlap: float) -> _Layout:
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    # int() truncation as in diffusers, so that odd tile sizes place and crop tiles exactly as it does.
    tile_latent = int(tile / scale_factor)
    step = int(tile_latent * (1 - overlap))
    if tile_latent < 1 or step < 1:
        raise ValueError(f"tile={tile} px is too small for scale_factor={scale_factor} and overlap={overlap}")
    blend = int(tile * overlap)
    return _Layout(tile_latent, step, blend, tile - blend)


def _fits(h: int, w: int, layout: _Layout) -> bool:
    # diffusers only tiles when some side exceeds one tile; below that a single call is both exact and cheapest.
    return h <= layout.tile_latent and w <= layout.tile_latent


def tile_count(h: int, w: int, *, tile: int, scale_factor: int, overlap: float = 0.25) -> int:
    """Decoder calls `decode_tiled` makes for an (h, w) latent (1 when it fits in one tile)."""
    layout = _layout(tile, scale_factor, overlap)
    if _fits(h, w, layout):
        return 1
    return len(range(0, h, layout.step)) * len(range(0, w, layout.step))


def _ramps(extent: int) -> tuple[np.ndarray, np.ndarray]:
    # The weights are formed in double and rounded once to float32, which is what torch does with the Python-float
    # factors in diffusers' blend; the products and the sum are then the same float32 operations, bit for bit.
    t = np.arange(extent, dtype=np.float64) / extent
    return (1 - t).astype(np.float32), t.astype(np.float32)


def _blend_rows(above: np.ndarray, tile: np.ndarray, extent: int) -> None:
    extent = min(above.shape[2], tile.shape[2], extent)
    if extent == 0:
        return
    fade_out, fade_in = _ramps(extent)
    tile[:, :, :extent, :] = above[:, :, -extent:, :] * fade_out[:, None] + tile[:, :, :extent, :] * fade_in[:, None]


def _blend_cols(left: np.ndarray, tile: np.ndarray, extent: int) -> None:
    extent = min(left.shape[3], tile.shape[3], extent)
    if extent == 0:
        return
    fade_out, fade_in = _ramps(extent)
    tile[:, :, :, :extent] = left[:, :, :, -extent:] * fade_out + tile[:, :, :, :extent] * fade_in


def decode_tiled(latents: np.ndarray, decode: Callable[[np.ndarray], np.ndarray], *, tile: int, scale_factor: int,
                 overlap: float = 0.25) -> np.ndarray:
    """(B, C, h, w) latents, already divided by the VAE scaling factor -> (B, 3, H, W) image, decoded tile by tile.

    `decode` maps a latent tile to its image tile (post_quant_conv included); `tile` is the tile side in pixels and
    `scale_factor` the VAE's pixels per latent cell. Each call sees at most tile // scale_factor latent rows and
    columns; a latent that fits in one tile is decoded by a single call, as in diffusers. Pick `tile` so that the
    tile's step (tile // scale_factor * (1 - overlap)) times scale_factor equals tile * (1 - overlap) (e.g. a multiple
    of 32 px at 0.25 overlap): otherwise the kept parts of the tiles do not add up to the image size, in diffusers too.
    """
    layout = _layout(tile, scale_factor, overlap)
    h, w = latents.shape[2:]
    if _fits(h, w, layout):
        return decode(latents)

    side = layout.tile_latent
    grid: list[list[np.ndarray]] = []
    for i in range(0, h, layout.step):
        row = []
        for j in range(0, w, layout.step):
            # Contiguous input for the session; the output is blended in place below, so it must be a writable
            # float32 array of our own.
            piece = np.ascontiguousarray(latents[:, :, i : i + side, j : j + side])
            row.append(np.require(decode(piece), dtype=np.float32, requirements=["W", "C"]))
        grid.append(row)

    # In diffusers the blends overwrite the tiles in place, so a tile's upper and left neighbours are used *after*
    # their own blending; visiting tiles in the same row-major order and blending in place reproduces that.
    out_rows = []
    for i, row in enumerate(grid):
        kept = []
        for j, piece in enumerate(row):
            if i > 0:
                _blend_rows(grid[i - 1][j], piece, layout.blend)
            if j > 0:
                _blend_cols(row[j - 1], piece, layout.blend)
            kept.append(piece[:, :, : layout.keep, : layout.keep])
        out_rows.append(np.concatenate(kept, axis=3))
    return np.concatenate(out_rows, axis=2)
