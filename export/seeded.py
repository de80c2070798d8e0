"""Seeded random weights for test and benchmark models."""

from __future__ import annotations

import math


def randomize(module, generator) -> None:
    """Give every parameter seeded values of a sensible scale (zero-initialised ones included), so that no path is
    silently inert in a parity test."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:  # linear / conv / embedding weights and modulation tables: variance-preserving
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm gains
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:  # biases and tables
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
