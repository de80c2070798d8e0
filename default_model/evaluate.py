"""How well the trained default draws what it is asked, measured through the engine on held-out prompts.

    python -m default_model.evaluate EXPORT_DIR [--grid docs/default-grid.png]

Prints the accuracy tables of the README: object colour, position, background and all three, for guidance 1 and 4.5
with both samplers, and the same for held-out scenes encoded, extrapolated as guidance extrapolates, and decoded
(how far the VAE lets guidance go); can write the README's grid of prompts and their pictures.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np

from default_model import scenes

# Request sizes (width, height) cycled over the prompts: square, and one portrait and one landscape that bin to
# trained bins (288x224 and 224x288), so binning and the resize back are part of what is scored.
SIZES = ((256, 256), (320, 256), (256, 330))
STEPS = 20
GRID_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow star in the center on a purple background",
    "a small white square at the top left on a green background",
    "a green triangle at the bottom right on a black background",
    "a blue ring on the right on an orange background",
    "a big orange diamond at the top on a white background",
    "a purple star next to a yellow square on a blue background",
    "a black circle in the lower left on a red background",
)


def request_for(prompt: str, size: tuple[int, int], guidance: float, scheduler: str, seed: int, **options):
    """The engine request the evaluation makes of a held-out prompt (`options`: other request fields)."""
    from engine import GenerationRequest

    return GenerationRequest(prompt=prompt, image_size=size, guidance_scale=guidance, scheduler=scheduler,
                             num_inference_steps=STEPS, seed=seed, **options)


def generate(engine, prompt: str, size: tuple[int, int], guidance: float, scheduler: str, seed: int) -> np.ndarray:
    """One (H, W, 3) uint8 picture from the engine (the pixels it encoded, not decoded back from the file)."""
    return engine.generate(request_for(prompt, size, guidance, scheduler, seed)).images[0].pixels


def evaluate(engine, guidance: float, scheduler: str, n: int = len(scenes.HELD_OUT)) -> dict[str, float]:
    """Accuracy per attribute over the first n held-out prompts (one picture each, seeds 0..n-1)."""
    prompts = scenes.held_out_prompts(n)
    readings = [scenes.read_picture(generate(engine, text, SIZES[i % len(SIZES)], guidance, scheduler, seed=i))
                for i, (text, _) in enumerate(prompts)]
    return scenes.score(readings, [scene for _, scene in prompts])


def extrapolated_scenes(engine, checkpoint: str | Path, reaches: tuple[float, ...] = (0.0, 1.0, 2.0, 3.5)
                        ) -> dict[float, dict[str, float]]:
    """Accuracy per attribute of the held-out scenes rendered at 256², encoded by the checkpoint's VAE (diffusers),
    pushed away from their flat mean latent by each reach s (z + s (z - mean)) and decoded by the engine.

    Classifier-free guidance at scale g extrapolates the model's estimate by s = g - 1 in latent space; a VAE that
    decodes such latents as other colours makes guidance hurt, whatever the transformer learnt."""
    import torch
    from diffusers import AutoencoderKL

    from default_model.train import pictures_to_tensor
    from engine.resolution import to_uint8

    vae = AutoencoderKL.from_pretrained(Path(checkpoint) / "vae").eval()
    held_out = [scene for _, scene in scenes.held_out_prompts()]
    with torch.no_grad():
        x = pictures_to_tensor([scenes.render(scene, 256, 256) for scene in held_out])
        z = vae.encode(x).latent_dist.mean.numpy() * np.float32(vae.config.scaling_factor)
    flat = z.mean(axis=(2, 3), keepdims=True)
    out = {}
    for reach in reaches:
        decoded = to_uint8(engine.decode((z + np.float32(reach) * (z - flat)).astype(np.float32)))
        out[reach] = scenes.score([scenes.read_picture(p) for p in decoded], held_out)
    return out


def grid(engine, out: Path, seed: int = 0) -> Path:
    """The README's picture: each prompt of GRID_PROMPTS at 256², guidance 4.5, under its caption."""
    from PIL import Image, ImageDraw

    tile, text_h, cols = 256, 34, 4
    rows = -(-len(GRID_PROMPTS) // cols)
    canvas = Image.new("RGB", (cols * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, prompt in enumerate(GRID_PROMPTS):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        canvas.paste(Image.fromarray(generate(engine, prompt, (tile, tile), 4.5, "DPM-SOLVER", seed)), (x, y))
        draw.multiline_text((x + 4, y + tile + 2), "\n".join(textwrap.wrap(prompt, 40)[:2]), fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--checkpoint", default=None, help="the checkpoint the export was made from (default: "
                   "EXPORT_DIR/checkpoint, where `pixart export` leaves the embedded default's)")
    p.add_argument("--grid", default=None, help="also write the grid of GRID_PROMPTS here")
    a = p.parse_args(argv)
    from engine import Engine
    from engine.vocabulary import SCHEDULERS

    engine = Engine.load(a.export_dir)
    print("| sampler | guidance | colour | position | background | all three |")
    print("|---|---|---|---|---|---|")
    for scheduler in SCHEDULERS:
        for guidance in (1.0, 4.5):
            acc = evaluate(engine, guidance, scheduler)
            print(f"| {scheduler} | {guidance} | " + " | ".join(f"{acc[k]:.0%}" for k in scenes.ATTRIBUTES) + " |")
    print("\n| VAE: extrapolation reach | colour | position | background | all three |")
    print("|---|---|---|---|---|")
    for reach, acc in extrapolated_scenes(engine, a.checkpoint or Path(a.export_dir) / "checkpoint").items():
        print(f"| {reach} | " + " | ".join(f"{acc[k]:.0%}" for k in scenes.ATTRIBUTES) + " |")
    if a.grid:
        print(grid(engine, Path(a.grid)))


if __name__ == "__main__":
    main()
