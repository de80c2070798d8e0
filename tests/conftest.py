"""Shared fixtures: the embedded default model, built and exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory) -> Path:
    from export.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("default") / "checkpoint")


@pytest.fixture(scope="session")
def default_export(default_checkpoint, tmp_path_factory) -> Path:
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("default_onnx")
    export_model(default_checkpoint, out, progress=False)
    return out


@pytest.fixture(scope="session")
def engine(default_export):
    from engine import Engine

    return Engine.load(default_export, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def reference_pipeline(default_checkpoint):
    """diffusers' own PixArtSigmaPipeline on the same weights: the parity reference."""
    import torch
    from diffusers import PixArtSigmaPipeline

    torch.set_num_threads(2)
    return PixArtSigmaPipeline.from_pretrained(default_checkpoint, torch_dtype=torch.float32)
