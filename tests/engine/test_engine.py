"""The engine's own behaviour: determinism, sizes, formats, guidance, progress, cancellation, batching, bad input."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine import Cancelled, GenerationRequest, InvalidRequest

FAST = dict(num_inference_steps=2, image_size=(512, 512))


def pixels(result) -> np.ndarray:
    return np.stack([im.pixels for im in result.images])


def test_engine_runs_without_torch_diffusers_or_transformers(default_export):
    code = f"""
import sys, json
from engine import Engine, GenerationRequest
e = Engine.load({str(default_export)!r})
r = e.generate(GenerationRequest(prompt="a cat", num_inference_steps=1, image_size=(256, 256), seed=1))
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))
print(json.dumps({{"heavy": heavy, "shape": list(r.images[0].pixels.shape)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "shape": [256, 256, 3]}


def test_same_seed_same_pixels_and_random_seed_is_reported(engine):
    a = engine.generate(GenerationRequest(prompt="a lighthouse", seed=7, **FAST))
    b = engine.generate(GenerationRequest(prompt="a lighthouse", seed=7, **FAST))
    c = engine.generate(GenerationRequest(prompt="a lighthouse", seed=8, **FAST))
    assert a.seed == 7 and np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    r = engine.generate(GenerationRequest(prompt="a lighthouse", **FAST))
    assert 0 <= r.seed < 2**63
    again = engine.generate(GenerationRequest(prompt="a lighthouse", seed=r.seed, **FAST))
    assert np.array_equal(pixels(r), pixels(again))


@pytest.mark.parametrize("fmt,pil_name", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_and_exact_custom_size(engine, fmt, pil_name):
    r = engine.generate(GenerationRequest(prompt="a boat", seed=3, output_format=fmt, num_inference_steps=1,
                                          image_size=(300, 700)))
    im = r.images[0]
    decoded = Image.open(io.BytesIO(im.data))
    assert decoded.format == pil_name and decoded.size == (300, 700) == (im.width, im.height)
    assert im.content_type == f"image/{fmt}"
    if fmt == "png":  # lossless: the bytes are the pixels
        assert np.array_equal(np.asarray(decoded.convert("RGB")), im.pixels)


def test_presets_give_their_sizes(engine):
    r = engine.generate(GenerationRequest(prompt="x", seed=1, num_inference_steps=1, image_size="landscape_16_9"))
    assert r.images[0].pixels.shape == (576, 1024, 3)


class CountingSession:
    """Wraps the real transformer session to record the batch each call gets (the model still runs)."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, names, feeds, run_options=None):
        self.batches.append(feeds["latents"].shape[0])
        return self.session.run(names, feeds, run_options)


def test_guidance_at_most_one_skips_the_unconditional_half(engine, monkeypatch):
    spy = CountingSession(engine.transformer)
    monkeypatch.setattr(engine, "transformer", spy)
    engine.generate(GenerationRequest(prompt="x", seed=1, guidance_scale=1.0, num_images=2, **FAST))
    engine.generate(GenerationRequest(prompt="x", seed=1, guidance_scale=4.5, num_images=2, **FAST))
    assert spy.batches == [2, 2, 4, 4]


def test_guidance_halves_in_one_call_or_two_give_the_same_image(engine, default_export):
    from engine import Engine

    split = Engine.load(default_export, providers=["CPUExecutionProvider"], guidance_in_one_batch=False)
    spy = CountingSession(split.transformer)
    split.transformer = spy
    request = GenerationRequest(prompt="x", seed=4, guidance_scale=4.5, **FAST)
    a, b = pixels(split.generate(request)), pixels(engine.generate(request))
    assert spy.batches == [1, 1, 1, 1]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_progress_timings_and_cancel(engine):
    seen = []
    r = engine.generate(GenerationRequest(prompt="x", seed=1, num_inference_steps=3, image_size=(512, 512)),
                        on_step=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert {"text_encoding", "denoising", "decoding", "safety", "image_encoding", "total"} <= set(r.timings)
    assert all(v >= 0 for v in r.timings.values())
    steps = []
    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest(prompt="x", seed=1, num_inference_steps=5, image_size=(512, 512)),
                        on_step=lambda s, t: steps.append(s), should_cancel=lambda: len(steps) >= 2)
    assert steps == [1, 2]  # stopped at the next step


def test_styles_change_the_prompt(engine):
    plain = engine.generate(GenerationRequest(prompt="a castle", seed=5, **FAST))
    styled = engine.generate(GenerationRequest(prompt="a castle", seed=5, style="Anime", **FAST))
    assert not np.array_equal(pixels(plain), pixels(styled))


BAD = [
    ("prompt", dict(prompt="   ")),
    ("prompt", dict(prompt="x" * 10_001)),
    ("negative_prompt", dict(negative_prompt="x" * 10_001)),
    ("style", dict(style="Watercolor")),
    ("image_size", dict(image_size="huge")),
    ("image_size.width", dict(image_size=(255, 512))),
    ("image_size.height", dict(image_size=(512, 2049))),
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("num_inference_steps", dict(num_inference_steps=101)),
    ("scheduler", dict(scheduler="EULER")),
    ("guidance_scale", dict(guidance_scale=float("nan"))),
    ("guidance_scale", dict(guidance_scale=20.5)),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=2**63)),
    ("num_images", dict(num_images=9)),
    ("num_images", dict(num_images=0)),
    ("output_format", dict(output_format="gif")),
    ("sync_mode", dict(sync_mode="yes")),
    ("latents", dict(latents=np.zeros((1, 4, 8, 8), np.float32))),
]


@pytest.mark.parametrize("field,bad", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_names_the_field(engine, field, bad):
    request = dataclasses.replace(GenerationRequest(prompt="ok"), **bad)
    with pytest.raises(InvalidRequest) as err:
        engine.check(request)
    assert [f for f, _ in err.value.violations] == [field]
    assert field in str(err.value)
    with pytest.raises(InvalidRequest):
        engine.generate(request)


def test_every_bad_field_is_reported_at_once(engine):
    request = GenerationRequest(prompt="", num_images=0, scheduler="?", seed=-5)
    with pytest.raises(InvalidRequest) as err:
        engine.check(request)
    assert {f for f, _ in err.value.violations} == {"prompt", "num_images", "scheduler", "seed"}


def test_text_trimming_changes_nothing_but_the_work(engine, default_export):
    from engine import Engine

    untrimmed = Engine.load(default_export, providers=["CPUExecutionProvider"], trim_text=False)
    texts = ["a tiny house on a hill", ""]
    short, short_mask = engine.encode_text(texts)
    full, full_mask = untrimmed.encode_text(texts)
    assert short.shape[1] == 32 and full.shape[1] == 300  # trimmed to the bucket above the longest prompt
    real = short_mask.astype(bool)
    np.testing.assert_array_equal(short_mask, full_mask[:, :32])
    np.testing.assert_allclose(short[real], full[:, :32][real], atol=1e-5)
    request = GenerationRequest(prompt=texts[0], seed=2, **FAST)
    a, b = pixels(engine.generate(request)), pixels(untrimmed.generate(request))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_prompt_embeddings_are_cached_and_bounded(engine, default_export, monkeypatch):
    from engine import Engine
    from engine.text_cache import EmbeddingCache

    fresh = Engine.load(default_export, providers=["CPUExecutionProvider"])
    calls = []
    real_run = fresh.text_encoder.run
    monkeypatch.setattr(fresh.text_encoder, "run", lambda names, feeds: calls.append(len(feeds["input_ids"])) or
                        real_run(names, feeds), raising=False)
    fresh.encode_text(["a dog", ""])
    fresh.encode_text(["a cat", ""])  # the empty negative prompt is not encoded again
    fresh.encode_text(["a dog", "a cat"])
    assert calls == [2, 1]

    cache = EmbeddingCache(max_bytes=3 * 400)
    for n in range(5):
        cache.put((str(n), 1), np.zeros(100, np.float32))  # 400 bytes each
    assert cache.bytes <= 1200 and list(k for k, _ in cache.entries) == ["2", "3", "4"]


def test_safety_checker_flags_and_replaces_images(engine):
    assert engine.has_safety_checker
    request = GenerationRequest(prompt="a beach", seed=21, num_images=4, num_inference_steps=1, image_size=(256, 256))
    plain = engine.generate(request)
    checked = engine.generate(dataclasses.replace(request, enable_safety_checker=True))
    expected = engine.safety_checker.check(pixels(plain))
    assert checked.has_nsfw_concepts == list(expected) and plain.has_nsfw_concepts == [False] * 4
    assert checked.timings["safety"] > 0
    for flagged, before, after in zip(expected, pixels(plain), pixels(checked), strict=True):
        if flagged:
            assert not after.any()  # blacked out, as diffusers does
        else:
            np.testing.assert_array_equal(after, before)


def test_an_invalid_request_among_many_fails_alone(engine):
    good = GenerationRequest(prompt="a kite", seed=9, num_inference_steps=1, image_size=(512, 512))
    bad = GenerationRequest(prompt="a kite", image_size="huge")
    out = engine.generate_many([bad, good])
    assert isinstance(out[0], InvalidRequest) and out[0].field == "image_size"
    np.testing.assert_array_equal(pixels(out[1]), pixels(engine.generate(good)))


def test_every_requested_size_comes_back_exactly(engine):
    # Scaling a bin to cover the request must not come out a pixel short (208 * (480 / 208) = 479.999... in floating
    # point made a 640x480 request come back 640x1).
    from engine.resolution import classify_bin, resize_and_crop

    for width in range(256, 2049, 37):
        for height in (256, 333, 480, 577, 768, 1000, 1365, 2048):
            h, w = classify_bin(height, width, engine.bins)
            out = resize_and_crop(np.zeros((1, 3, h, w), np.float32), width, height)
            assert out.shape[2:] == (height, width), (width, height)
    r = engine.generate(GenerationRequest(prompt="x", image_size=(640, 480), num_inference_steps=1, seed=1))
    assert r.images[0].pixels.shape == (480, 640, 3)


def test_close_releases_the_sessions_and_refuses_work_after(default_export):
    import gc
    import weakref

    from engine import Engine

    fresh = Engine.load(default_export, providers=["CPUExecutionProvider"], io_binding=True)
    request = GenerationRequest(prompt="a boat", seed=5, **FAST)
    generation = fresh.prepare(request)
    fresh.step([generation])
    sessions = [weakref.ref(s) for s in (fresh.text_encoder, fresh.transformer, fresh.vae_decoder,
                                         fresh.safety_checker.session)]
    bound = fresh.bound_transformer
    assert bound.slots and fresh.text_cache.entries
    fresh.close()
    fresh.close()  # a second close does nothing
    assert fresh.closed and not bound.slots and not fresh.text_cache.entries and fresh.text_cache.bytes == 0
    del bound
    gc.collect()
    assert [ref() for ref in sessions] == [None] * 4
    for call in (lambda: fresh.prepare(request), lambda: fresh.step([generation]), lambda: fresh.step([]),
                 lambda: fresh.finish([generation]), lambda: fresh.generate(request)):
        with pytest.raises(RuntimeError, match="the engine is closed"):
            call()
