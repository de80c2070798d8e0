"""diffusers' own first-block cache on the same trained weights, beside the engine's step cache.

    python -m benchmarks.step_cache_diffusers EXPORT_DIR [--thresholds 0.05,0.1,0.2] [--out benchmarks/results]

diffusers ships FirstBlockCache as a hook (`apply_first_block_cache`); PixArt's transformer is not a `CacheMixin`,
but its blocks are registered for the hook, so it applies once the loop's cache context is set by hand (the PixArt
pipeline sets none). It decides once per transformer call, for the whole batch (both guidance halves), from the
relative change of the first block's residual, and always runs that first block. Run over the 36 held-out prompts
of default_model.evaluate at 20 steps with diffusers' DPM-Solver, at guidance 1 and 4.5, from the initial latents
the engine draws for the same seeds (so "off" is the engine's `off`, to parity): accuracy (the evaluation's scorer),
PSNR against diffusers without the cache, and the fraction of calls that ran the remaining blocks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common.images import psnr, ssim
from benchmarks.common.report import write_report
from default_model import evaluate, scenes


def _pipeline(checkpoint: Path):
    import torch
    from diffusers import PixArtSigmaPipeline

    torch.manual_seed(0)
    return PixArtSigmaPipeline.from_pretrained(str(checkpoint))


def _with_first_block_cache(pipe, threshold: float):
    """The hook on the transformer, with the cache context the pipeline does not set; returns a reset function."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    blocks = pipe.transformer.transformer_blocks

    def reset() -> None:  # a fresh history for each image, as the engine's rows start with none
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).reset_stateful_hooks()
            _set_cache_context(block, CacheContext("batch"))

    return reset


def _count_calls(module) -> list[int]:
    """A one-element counter of `module`'s calls: the second block's attention runs only when the hook lets the
    remaining blocks run."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def engine_latents(manifest, seed: int, width: int, height: int):
    """The initial latents Engine.prepare draws for this seed and size (at the binned size), as a torch tensor."""
    import torch

    from engine.resolution import classify_bin

    h, w = classify_bin(height, width, manifest["aspect_ratio_bins"])
    scale = int(manifest["vae"]["scale_factor"])
    shape = (1, int(manifest["transformer"]["config"]["in_channels"]), h // scale, w // scale)
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def run(export_dir: Path, thresholds: list[float], n: int = len(scenes.HELD_OUT)) -> list[dict]:
    from engine.manifest import Manifest

    manifest = Manifest.load(export_dir)
    checkpoint = export_dir / "checkpoint"
    prompts = scenes.held_out_prompts(n)
    rows = []
    for guidance in (1.0, 4.5):
        reference: list[np.ndarray] = []
        for threshold in [None, *thresholds]:
            pipe = _pipeline(checkpoint)
            reset = _with_first_block_cache(pipe, threshold) if threshold is not None else (lambda: None)
            computed = _count_calls(pipe.transformer.transformer_blocks[1].attn1)
            pictures, started = [], time.perf_counter()
            for i, (text, _) in enumerate(prompts):
                reset()
                width, height = evaluate.SIZES[i % len(evaluate.SIZES)]
                image = pipe(text, height=height, width=width, num_inference_steps=evaluate.STEPS,
                             guidance_scale=guidance, latents=engine_latents(manifest, i, width, height),
                             output_type="np").images[0]
                pictures.append((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            seconds = time.perf_counter() - started
            reference = reference or pictures
            accuracy = scenes.score([scenes.read_picture(p) for p in pictures], [s for _, s in prompts])
            rest = computed[0] / (evaluate.STEPS * len(prompts))
            blocks = len(pipe.transformer.transformer_blocks)
            rows.append({
                "guidance": guidance, "threshold": threshold, **accuracy, "rest_computed": rest,
                "blocks_computed": (1 + (blocks - 1) * rest) / blocks,
                "psnr": float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(pictures, reference, strict=True)])),
                "ssim": float(np.mean([ssim(a, b) for a, b in zip(pictures, reference, strict=True)])),
                "seconds": seconds,
            })
            print(_line(rows[-1]), flush=True)
    return rows


HEADER = ("| guidance | FBCache threshold | calls running the rest | block work computed | colour | position | "
          "background | all three | PSNR vs no cache (dB, capped at 99) | SSIM | seconds |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _line(row: dict) -> str:
    threshold = "off" if row["threshold"] is None else f"{row['threshold']:g}"
    return (f"| {row['guidance']:g} | {threshold} | {row['rest_computed']:.0%} | {row['blocks_computed']:.0%} | "
            + " | ".join(f"{row[k]:.0%}" for k in scenes.ATTRIBUTES)
            + f" | {row['psnr']:.1f} | {row['ssim']:.3f} | {row['seconds']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", type=Path, help="the trained default's export (its checkpoint beside it)")
    p.add_argument("--thresholds", default="0.05,0.1,0.2")
    p.add_argument("--prompts", type=int, default=len(scenes.HELD_OUT))
    p.add_argument("--out", default=None, help="write step-cache-diffusers.json/.md here")
    a = p.parse_args(argv)
    print(HEADER)
    rows = run(a.export_dir, [float(t) for t in a.thresholds.split(",")], a.prompts)
    if a.out:
        command = f"python -m benchmarks.step_cache_diffusers EXPORT_DIR --thresholds {a.thresholds} --out {a.out}"
        markdown = (f"diffusers' FirstBlockCache on the trained embedded default: {a.prompts} held-out prompts, "
                    f"{evaluate.STEPS} steps, DPM-Solver, seeds 0..{a.prompts - 1}.\n\n{HEADER}\n"
                    + "\n".join(_line(r) for r in rows) + f"\n\nMade by `{command}`.\n")
        print(write_report(Path(a.out), "step-cache-diffusers", {"steps": evaluate.STEPS, "rows": rows}, markdown))


if __name__ == "__main__":
    main()
