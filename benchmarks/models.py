"""Checkpoints to benchmark on: `tiny` (the embedded default model), `small` (real widths, few layers), `full`, and
`wide` (the default's T5 and VAE around a 384-wide transformer: a model whose denoising steps dominate a request's
time on a CPU, for the load benchmark, where `small`'s SDXL VAE decode would dominate instead).

`tiny` at 256² is the embedded default itself (trained weights); every other is a random, seeded
PixArt-Σ-architecture checkpoint in diffusers format, built once and cached under
benchmarks/.cache/ together with its ONNX export, so that reruns go straight to measuring.

Sizes: the engine and diffusers both bin a request to the checkpoint's table, and that table follows the
transformer's `sample_size` (32 -> 256² bins, 64 -> 512², 128 -> 1024²). So a benchmark "at 512²" is built with
sample_size 64 and interpolation_scale 1 (the published 512-MS layout), and then both sides truly run the transformer
at 512² with no resize. The weights do not depend on the side (the positional embedding is a buffer, not a
parameter), so all sides of one config share the same drawn weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from default_model.config import SEED, T5_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG

CACHE = Path(__file__).parent / ".cache"
CONFIGS = ("tiny", "small", "full", "wide")
# Pixel side -> (sample_size, interpolation_scale), as diffusers' conversion script maps them
# (docs/pixart-sigma.md §1.1).
SIDES = {256: (32, 0.5), 512: (64, 1.0), 1024: (128, 2.0), 2048: (256, 4.0)}
COMPLETE = ".complete"

# The real widths (docs/pixart-sigma.md §1.2-1.4) with few layers: T5's fp32 weights still pass protobuf's 2 GB
# limit, so the export goes through the external-data path as the real model does.
SMALL_TRANSFORMER = {
    **TRANSFORMER_CONFIG,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "num_layers": 4,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
}
SMALL_T5 = {**T5_CONFIG, "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 3,
            "num_heads": 64}
SDXL_VAE = {**VAE_CONFIG, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "sample_size": 512, "mid_block_add_attention": True}
FULL_TRANSFORMER = {**SMALL_TRANSFORMER, "num_layers": 28}
# About 100 ms a guided step at 256² on a 2-core CPU against ~30 ms for the tiny VAE's decode
WIDE_TRANSFORMER = {**TRANSFORMER_CONFIG, "num_attention_heads": 6, "attention_head_dim": 64,
                    "cross_attention_dim": 384}
FULL_T5 = {**SMALL_T5, "num_layers": 24}


def configs(config: str) -> tuple[dict, dict, dict]:
    """(transformer, T5, VAE) configs of `config`; build_checkpoint sets the layout of a side."""
    if config == "tiny":
        return dict(TRANSFORMER_CONFIG), dict(T5_CONFIG), dict(VAE_CONFIG)
    if config == "small":
        return dict(SMALL_TRANSFORMER), dict(SMALL_T5), dict(SDXL_VAE)
    if config == "full":
        return dict(FULL_TRANSFORMER), dict(FULL_T5), dict(SDXL_VAE)
    if config == "wide":
        return dict(WIDE_TRANSFORMER), dict(T5_CONFIG), dict(VAE_CONFIG)
    raise ValueError(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")


def build_checkpoint(config: str, out_dir: str | Path, *, side: int = 1024, seed: int | None = None) -> Path:
    """Write the `config` checkpoint laid out for `side`² (diffusers format) to `out_dir` and return it."""
    from default_model.checkpoint import build_default_model

    if side not in SIDES:
        raise ValueError(f"side {side}: diffusers has bin tables for {', '.join(map(str, SIDES))} only")
    seed = SEED if seed is None else seed
    out = Path(out_dir)
    if config == "tiny" and side == 256 and seed == SEED:
        return build_default_model(out)  # the very default model (trained weights), byte for byte
    transformer_cfg, t5_cfg, vae_cfg = configs(config)
    sample_size, interpolation = SIDES[side]
    transformer_cfg.update(sample_size=sample_size, interpolation_scale=interpolation)
    # `full`'s T5-XXL is drawn block by block at export (export.graphs.text_encoder.SeededWeights): 19 GB never written
    return _build(out, transformer_cfg, t5_cfg, vae_cfg, seed, seeded_text_encoder=config == "full")


def _build(out: Path, transformer_cfg: dict, t5_cfg: dict, vae_cfg: dict, seed: int, **options) -> Path:
    from default_model.checkpoint import build_checkpoint

    build_checkpoint(out, transformer_cfg, t5_cfg, vae_cfg, seed, **options)
    (out / "README.md").write_text(f"Random seeded (seed {seed}) PixArt-Σ-architecture checkpoint for benchmarks.\n")
    return out


def cache_dir(config: str, side: int, root: Path = CACHE) -> Path:
    return Path(root) / f"{config}-{side}"


def cached_checkpoint(config: str, side: int, root: Path = CACHE) -> tuple[Path, float | None]:
    """The cached checkpoint for (config, side), built now if missing; with the build seconds when built now."""
    out = cache_dir(config, side, root) / "checkpoint"
    if (out / COMPLETE).exists():
        return out, None
    shutil.rmtree(out, ignore_errors=True)  # a half-written one from an interrupted run
    started = time.perf_counter()
    build_checkpoint(config, out, side=side)
    seconds = time.perf_counter() - started
    (out / COMPLETE).write_text(json.dumps({"build_seconds": round(seconds, 2)}))
    return out, seconds


def cached_export(
    config: str, side: int, progress: bool = False, export_options: dict | None = None, rebuild: bool = False,
    root: Path = CACHE,
) -> tuple[Path, Path, dict]:
    """(checkpoint, export folder, info) for (config, side); info holds build and export seconds and whether cached.

    `export_options` are export_model keywords (e.g. {"int8": true}); each set of them has its own cached folder.
    `rebuild` re-exports even when cached: an export made by an older exporter lacks what the engine now expects.
    """
    from export.onnx_export import MANIFEST

    export_options = dict(export_options or {})
    checkpoint, build_seconds = cached_checkpoint(config, side, root)
    key = json.dumps(export_options, sort_keys=True)
    suffix = f"-{hashlib.sha256(key.encode()).hexdigest()[:8]}" if export_options else ""
    out = cache_dir(config, side, root) / f"onnx{suffix}"
    cached = (out / MANIFEST).exists() and not rebuild  # the manifest is written last: it means a finished export
    if not cached:
        shutil.rmtree(out, ignore_errors=True)
        # In a child process: tracing holds copies of every weight, and this process goes on to measure RSS.
        options = json.dumps({**export_options, "progress": progress})
        code = "import json, sys; from export.onnx_export import export_model; " \
               "export_model(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))"
        subprocess.run([sys.executable, "-c", code, str(checkpoint), str(out), options], check=True,
                       cwd=Path(__file__).resolve().parent.parent)
    manifest = json.loads((out / MANIFEST).read_text())
    built = json.loads((checkpoint / COMPLETE).read_text()).get("build_seconds")
    info = {
        "checkpoint": str(checkpoint),
        "export": str(out),
        "build_seconds": build_seconds if build_seconds is not None else built,
        "export_seconds": manifest.get("export_seconds"),
        "export_cached": cached,
        "export_options": export_options,
        "variants_in_export": sorted(manifest.get("variants", {})),
        # Measured on disk: the manifest's own layout of sizes has changed between exporter versions.
        "export_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    }
    return checkpoint, out, info
