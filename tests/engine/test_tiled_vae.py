"""Tiled VAE decoding (engine.tiling) against diffusers' AutoencoderKL.tiled_decode on the same weights and latents.

Decoder outputs are compared raw (unclamped, nominally in [-1, 1]); PSNR takes that range's width, 2, as its peak.
Measured on the default model (CPU, fp32): engine vs diffusers max |diff| ~4e-6 and PSNR ~133 dB; tiled vs full
decode PSNR ~31 dB with 128 px tiles and ~23 dB with 64 px tiles (max |diff| 0.56 to 1.4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.runtime import create_session
from engine.tiling import decode_tiled, tile_count

SCALE = 8  # 2 ** (len(block_out_channels) - 1) with the default VAE's four blocks
SCALING_FACTOR = 0.13025  # the default VAE's scaling_factor: latents reach the decoder divided by it

# Both sides run fp32 of the same weights; ONNX Runtime and torch differ only in accumulation order (~1e-5 on the
# full decode, ~4e-6 measured here), so 1e-3 leaves a wide margin yet catches any wrong weight or misplaced pixel.
MAX_ABS_DIFF_VS_DIFFUSERS = 1e-3
MIN_PSNR_VS_DIFFUSERS = 100.0  # measured ~133 dB
# Tiling must change the result well beyond float noise, or it silently fell back to one full decode (0.56 measured).
MIN_TILING_EFFECT = 1e-2
# Yet stay close to the full decode: on these random weights the seams cost more than on a trained VAE; measured
# 23 dB at the smallest tile used here (64 px), so 20 dB keeps a 3 dB margin on this deterministic data.
MIN_PSNR_VS_FULL = 20.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(2.0**2 / mse)


def latents_of(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) / SCALING_FACTOR).astype(np.float32)


@pytest.fixture(scope="module")
def decoder(default_export: Path) -> Callable[[np.ndarray], np.ndarray]:
    session = create_session(default_export / "vae_decoder.onnx", ["CPUExecutionProvider"])
    return lambda latents: session.run(None, {"latents": latents})[0]


@pytest.fixture(scope="module")
def reference_vae(default_checkpoint: Path):
    from diffusers import AutoencoderKL

    torch.set_num_threads(2)
    return AutoencoderKL.from_pretrained(default_checkpoint / "vae", torch_dtype=torch.float32).eval()


class Recorder:
    """Wraps the real decoder, keeping the shape of every latent tile it is given."""

    def __init__(self, decode: Callable[[np.ndarray], np.ndarray]) -> None:
        self.decode = decode
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        self.shapes.append(latents.shape)
        return self.decode(latents)


@pytest.mark.parametrize(
    ("shape", "tile"),
    [
        ((1, 4, 48, 48), 128),  # square, 4x4 tiles of 16 latent cells, origins every 12: sides a multiple of the step
        ((1, 4, 40, 64), 128),  # non-square, sides not multiples of 12: small tiles at the bottom and right edges
        ((2, 4, 36, 52), 64),  # batch of two, 8-cell tiles every 6 cells, 6x9 tiles
    ],
)
def test_tiled_decode_matches_diffusers(decoder, reference_vae, shape, tile):
    latents = latents_of(shape)
    ours = decode_tiled(latents, decoder, tile=tile, scale_factor=SCALE)

    # enable_tiling() alone would not tile here, nor even at 1024²: with the SDXL VAE config the default tile is
    # sample_size (1024 px, 128 latent cells), so a 1024² image fits in one tile. Set both sizes, consistently.
    reference_vae.enable_tiling()
    reference_vae.tile_sample_min_size = tile
    reference_vae.tile_latent_min_size = tile // SCALE
    with torch.no_grad():
        ref = reference_vae.decode(torch.from_numpy(latents)).sample.numpy()
    full = decoder(latents)

    assert ours.shape == ref.shape == (shape[0], 3, shape[2] * SCALE, shape[3] * SCALE)
    assert tile_count(*shape[2:], tile=tile, scale_factor=SCALE) > 4
    max_diff = float(np.abs(ours - ref).max())
    quality = psnr(ours, ref)
    effect = float(np.abs(ours - full).max())
    vs_full = psnr(ours, full)
    print(f"\n{shape} tile {tile}: vs diffusers max diff {max_diff:.2e}, PSNR {quality:.1f} dB; "
          f"vs full decode max diff {effect:.3f}, PSNR {vs_full:.1f} dB")
    assert max_diff <= MAX_ABS_DIFF_VS_DIFFUSERS
    assert quality >= MIN_PSNR_VS_DIFFUSERS
    assert effect > MIN_TILING_EFFECT
    assert vs_full > MIN_PSNR_VS_FULL


@pytest.mark.parametrize("side", [(16, 16), (16, 10), (5, 16)])
def test_latent_within_one_tile_is_decoded_whole(decoder, side):
    latents = latents_of((1, 4, *side))
    calls = Recorder(decoder)
    image = decode_tiled(latents, calls, tile=128, scale_factor=SCALE)
    assert calls.shapes == [latents.shape]
    assert tile_count(*side, tile=128, scale_factor=SCALE) == 1
    np.testing.assert_array_equal(image, decoder(latents))


def test_each_call_sees_at_most_one_tile(decoder):
    tile = 64
    latents = latents_of((1, 4, 40, 27))
    calls = Recorder(decoder)
    image = decode_tiled(latents, calls, tile=tile, scale_factor=SCALE)
    assert image.shape == (1, 3, 40 * SCALE, 27 * SCALE)
    assert len(calls.shapes) == tile_count(40, 27, tile=tile, scale_factor=SCALE) == 7 * 5
    assert all(s[2] <= tile // SCALE and s[3] <= tile // SCALE for s in calls.shapes)
    # Row-major tiles of 8 cells every 6, cut (not padded) at the bottom and right borders.
    rows, cols = [8] * 6 + [4], [8] * 4 + [3]
    assert calls.shapes == [(1, 4, r, c) for r in rows for c in cols]


@pytest.mark.parametrize(("shape", "tile"), [((1, 4, 40, 64), 128), ((2, 4, 23, 17), 40)])
def test_blending_is_bit_exact_given_diffusers_tiles(reference_vae, shape, tile):
    """With diffusers' own per-tile decoder as `decode`, only placement, blending and cropping remain: these must
    reproduce tiled_decode bit for bit (40 px tiles: 5-cell tiles every 3 cells, a size where rounding matters)."""
    def torch_decode(tile_latents: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = torch.from_numpy(tile_latents)
            return reference_vae.decoder(reference_vae.post_quant_conv(z)).numpy()

    latents = latents_of(shape, seed=1)
    reference_vae.enable_tiling()
    reference_vae.tile_sample_min_size = tile
    reference_vae.tile_latent_min_size = tile // SCALE
    with torch.no_grad():
        ref = reference_vae.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_array_equal(decode_tiled(latents, torch_decode, tile=tile, scale_factor=SCALE), ref)
