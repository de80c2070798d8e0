"""The live-preview map: latents straight to RGB without the VAE, fitted here on the model's own VAE.

A diffusion step's data estimate x0 is a latent picture; the VAE decoder turns it into pixels, but costs as much as
several steps. A latent pixel's channels are close to a linear function of the colour of the 8x8 patch it stands
for, so a 3 x C matrix and a bias, applied per latent pixel, draw a small, blurry but faithful picture for almost
nothing (the well-known "latent to RGB" previews of SD front ends use such factors). Rather than ship constants for
one VAE, the map is fitted at export time by least squares on this checkpoint's own VAE: smooth random pictures are
encoded, the latents decoded again, and the decoded colours (averaged over each latent pixel's patch) regressed on
the latents as the sampler holds them (scaled by the VAE's scaling factor). The embedded default and real SDXL VAE
weights each get their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def smooth_pictures(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` pictures in [-1, 1]: random colour fields of a few cells, bicubic-smoothed (flat areas, soft edges
    and saturated colours, like what a VAE meets)."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.rand(count, 3, 6, 6, generator=generator)
    return F.interpolate(cells, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


@torch.no_grad()
def fit_preview(vae: nn.Module, *, count: int = 8, size: int = 256, seed: int = 0) -> dict:
    """{weights (3 x C), bias (3), rmse, patch}: RGB in [0, 1] = weights @ latent + bias, per latent pixel."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    pictures = smooth_pictures(count, size, seed).to(next(vae.parameters()).dtype)
    latents = vae.encode(pictures).latent_dist.mean
    decoded = vae.decode(latents, return_dict=False)[0]
    colours = F.avg_pool2d(((decoded.float() + 1) / 2).clamp(0, 1), scale)  # one colour per latent pixel
    held = latents.float() * float(vae.config.scaling_factor)  # as the sampler holds them
    channels = held.shape[1]
    x = torch.cat([held.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(held.numel() // channels, 1)], 1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # (C + 1, 3)
    rmse = float(((x @ solution - y) ** 2).mean().sqrt())
    return {"weights": solution[:channels].T.tolist(), "bias": solution[channels].tolist(), "rmse": round(rmse, 4),
            "patch": scale, "fitted_on": f"{count} smooth random pictures of {size}x{size}, seed {seed}"}
