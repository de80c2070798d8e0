"""The VAE decoder as one ONNX graph: scaled latents in, the picture out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.onnx_io import export_graph


class VaeDecoderGraph(nn.Module):
    """Scaled latents in (the host divides by the scaling factor), image in about [-1, 1] out."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def export_vae_decoder(vae: nn.Module, path: Path, latent_hw: tuple[int, int] = (8, 12)) -> Path:
    latents = torch.randn(1, vae.config.latent_channels, *latent_hw)
    return export_graph(
        VaeDecoderGraph(vae),
        (latents,),
        path,
        inputs=["latents"],
        outputs=["image"],
        dynamic={"latents": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "height", 3: "width"}},
    )
