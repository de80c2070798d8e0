"""Shared fixtures: the embedded default model, built and exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.servers import export_dir, shared_engine


@pytest.fixture(scope="session")
def default_export() -> Path:
    """`pixart export --out DIR` of the embedded default (one build for every test module, servers included)."""
    return export_dir()


@pytest.fixture(scope="session")
def default_checkpoint(default_export, tmp_path_factory) -> Path:
    """The diffusers-format checkpoint the export was made from (built next to it by `pixart export`)."""
    built = default_export / "checkpoint"
    if (built / "model_index.json").exists():
        return built
    from default_model.checkpoint import build_default_model

    return build_default_model(tmp_path_factory.mktemp("default") / "checkpoint")


@pytest.fixture(scope="session")
def engine(default_export):
    """One loaded engine for the whole session, the in-process servers' included (memory on 2-core CI boxes)."""
    return shared_engine()


@pytest.fixture(scope="session")
def reference_pipeline(default_checkpoint):
    """diffusers' own PixArtSigmaPipeline on the same weights: the parity reference."""
    import torch
    from diffusers import PixArtSigmaPipeline

    torch.set_num_threads(2)
    return PixArtSigmaPipeline.from_pretrained(default_checkpoint, torch_dtype=torch.float32)


# The export options of the GPU benchmark script (benchmarks/gpu.sh), so that its CPU proof finds this export cached.
SMALL_EXPORT_OPTIONS = {"optimize": False, "precisions": ["fp16"]}


@pytest.fixture(scope="session")
def small_export() -> Path:
    """The `small` config (real widths: 1152-wide transformer, 4096-wide T5, the SDXL VAE) at the 256 layout, with
    its fp16 variant; built once into the benchmarks' cache (git-ignored), shared by the tests that need it."""
    from benchmarks.models import cached_export

    _, export, _ = cached_export("small", 256, export_options=SMALL_EXPORT_OPTIONS)
    return export
