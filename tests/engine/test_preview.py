"""Live previews: the export fits a latent -> RGB map on its own VAE, and a step's data estimate drawn with it is a
small JPEG of the picture as it forms, close to the image the request ends with (cost: benchmarks, not here)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from engine import GenerationRequest
from engine.preview import LONGEST_SIDE

SIZE = (512, 256)


def _pixels(data: bytes, size: tuple[int, int] = (32, 16)) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BOX), np.float32) / 255


def _previews(engine, seed: int) -> tuple[list[tuple[int, bytes]], bytes]:
    request = GenerationRequest(prompt="a red circle on a blue background", seed=seed, num_inference_steps=12,
                                image_size=SIZE, preview_every=3)
    generation = engine.prepare(request)
    previews = []
    while not generation.done:
        engine.step([generation])
        if (picture := engine.preview(generation)) is not None:
            previews.append((generation.step_index, picture))
    (result,) = engine.finish([generation])
    return previews, result.images[0].data


def test_the_export_fits_a_preview_map_on_its_own_vae(default_export) -> None:
    preview = json.loads((default_export / "manifest.json").read_text())["preview"]
    assert np.asarray(preview["weights"]).shape == (3, 4) and len(preview["bias"]) == 3
    assert 0 < preview["rmse"] < 0.25  # on [0, 1] colours, per latent pixel


def test_previews_come_every_k_steps_as_small_jpegs_and_look_like_the_image(engine) -> None:
    previews, final = _previews(engine, seed=3)
    assert [step for step, _ in previews] == [3, 6, 9]  # not after the last step: the image itself comes next
    first = Image.open(io.BytesIO(previews[0][1]))
    assert first.format == "JPEG" and max(first.size) == LONGEST_SIDE and first.size[0] == 2 * first.size[1]
    _, other = _previews(engine, seed=11)
    last, mine, theirs = _pixels(previews[-1][1]), _pixels(final), _pixels(other)
    assert np.abs(last - mine).mean() < np.abs(last - theirs).mean()  # its own picture, not any picture
    assert np.abs(last - mine).mean() < 0.2


def test_a_request_without_previews_makes_none(engine) -> None:
    generation = engine.prepare(GenerationRequest(prompt="x", seed=1, num_inference_steps=3, image_size=SIZE))
    while not generation.done:
        engine.step([generation])
        assert generation.preview is None and engine.preview(generation) is None


def test_the_cost_benchmark_measures_a_preview_beside_its_step(default_export) -> None:
    from benchmarks.preview_cost import measure

    r = measure(str(default_export), 256, 4)
    assert r["step_ms"] > 0 and 0 < r["preview_ms"] and r["jpeg_bytes"] > 100
