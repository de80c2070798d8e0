"""The step cache's "blocks" mechanism (first-block-residual caching): the transformer's parts compute what the
whole graph computes, rows that skip run the head and the tail but not the body, its decisions and images follow
diffusers' own FirstBlockCache on the same weights, and a cached request does not depend on its companions.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.common.images import psnr
from engine import Engine
from engine.manifest import TRANSFORMER_PARTS, Manifest
from engine.positions import sincos_pos_embed
from engine.step_cache import BLOCK_POLICIES, BlockRowCache, CachePolicy
from tests.engine.test_continuous import pixels
from tests.engine.test_step_cache import assert_independent_of_companions, request


@pytest.fixture(scope="module")
def blocks(default_export):
    engine = Engine.load(default_export, step_cache_mechanism="blocks")
    yield engine
    engine.close()


class CountingSession:
    """A session that records the rows of every run (ONNX Runtime's sessions run in C++: wrap, do not patch)."""

    def __init__(self, session: ort.InferenceSession):
        self.session, self.rows = session, []

    def run(self, names, feeds, run_options=None):
        self.rows.append(len(feeds["hidden"]))
        return self.session.run(names, feeds, run_options)

    def get_outputs(self):
        return self.session.get_outputs()


@pytest.fixture
def body_rows(blocks):
    parts = blocks.transformer_parts
    counting = parts.body = CountingSession(parts.body)
    yield counting.rows
    parts.body = counting.session


# -- the parts and the rule, on plain arrays ---------------------------------------------------------------------
def test_the_parts_compute_what_the_whole_transformer_computes(default_export):
    manifest = Manifest.load(default_export)
    _, files = manifest.files("fp32")
    head, body, tail, whole = (ort.InferenceSession(str(files[name]), providers=["CPUExecutionProvider"])
                               for name in (*TRANSFORMER_PARTS, "transformer"))
    config = manifest["transformer"]["config"]
    rng = np.random.default_rng(0)
    feeds = {
        "latents": rng.standard_normal((3, config["in_channels"], 32, 48), dtype=np.float32),
        "timestep": np.array([999.0, 500.0, 3.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 9, config["caption_channels"]), dtype=np.float32),
        "encoder_attention_mask": np.array([[1] * 9, [1] * 4 + [0] * 5, [1] * 2 + [0] * 7], np.int64),
        "pos_embed": sincos_pos_embed(manifest["transformer"]["inner_dim"], 16, 24,
                                      *manifest["transformer"]["pos_embed"].values()),
    }
    out = dict(zip([o.name for o in head.get_outputs()], head.run(None, feeds), strict=True))
    hidden = body.run(None, {k: out[k] for k in ("hidden", "t6", "context", "bias")})[0]
    parts = tail.run(None, {"hidden": hidden, "embedded_timestep": out["embedded_timestep"],
                            "latents": feeds["latents"]})[0]
    np.testing.assert_allclose(parts, whole.run(None, feeds)[0], rtol=0, atol=1e-5)
    assert manifest["transformer"]["head_blocks"] == 1


def test_a_row_skips_the_body_while_its_head_residual_changes_less_than_the_threshold():
    row = BlockRowCache(CachePolicy(threshold=0.1, first_steps=0.1, last_steps=0.1, max_skips=2))
    r = np.ones((4, 8), np.float32)
    assert row.computes(r, 0, 20), "nothing cached yet"
    row.record(r, np.full((4, 8), 5.0, np.float32))
    assert not row.computes(r * 1.05, 3, 20), "mean |r - r'| / mean |r'| = 0.05"
    assert row.computes(r * 1.2, 3, 20), "0.2 is over the threshold"
    assert row.computes(r, 19, 20), "inside the last steps"
    np.testing.assert_array_equal(row.reuse(), np.full((4, 8), 5.0))
    row.reuse()
    assert row.computes(r, 5, 20), "max_skips reached"
    assert row.nbytes == 2 * r.nbytes


# -- the engine --------------------------------------------------------------------------------------------------
def test_off_with_the_blocks_mechanism_is_the_engine_without_caching(blocks, engine):
    result = blocks.generate(request("off", steps=8))
    np.testing.assert_array_equal(pixels(result), pixels(engine.generate(request("off", steps=8))))
    assert (result.steps_computed, result.steps_cached) == (16, 0)


@pytest.mark.parametrize("sampler", ["DPM-SOLVER", "SA-SOLVER"])
def test_rows_that_skip_run_the_head_and_tail_but_not_the_body(blocks, body_rows, sampler):
    result = blocks.generate(request("fast", sampler=sampler))
    assert result.steps_cached > 0
    assert result.steps_computed + result.steps_cached == 40
    assert sum(body_rows) == result.steps_computed
    assert len(body_rows) < 20, "steps where every row skips run no body"
    assert set(body_rows) == {2}, "a guided image's halves compute or skip together"


def test_a_cached_image_stays_close_to_the_exact_one(blocks):
    # measured on this prompt at guidance 4.5: balanced 36 dB (the README's table has 36 prompts)
    exact = blocks.generate(request("off")).images[0].pixels
    assert psnr(exact, blocks.generate(request("balanced")).images[0].pixels) > 25


def test_guidance_halves_run_one_at_a_time_as_in_one_call(default_export, blocks):
    apart = Engine.load(default_export, step_cache_mechanism="blocks", guidance_in_one_batch=False)
    try:
        a, b = apart.generate(request("fast")), blocks.generate(request("fast"))
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
        assert (a.steps_computed, a.steps_cached) == (b.steps_computed, b.steps_cached)
    finally:
        apart.close()


@pytest.mark.parametrize("sampler", ["DPM-SOLVER", "SA-SOLVER"])
def test_a_block_cached_request_does_not_depend_on_its_companions(blocks, sampler):
    assert_independent_of_companions(blocks, sampler)


def test_a_rows_residuals_are_bounded_and_freed_when_it_finishes(blocks):
    g = blocks.prepare(request("fast", images=2))
    tokens = np.prod(g.latents.shape[2:]) // blocks.patch_size**2
    while not g.done:
        blocks.step([g])
        if not g.done:
            assert 0 < g.cache.nbytes <= 2 * g.rows * tokens * blocks.inner_dim * 4
    assert g.cache is None


def test_an_export_without_parts_is_refused_with_what_to_do(default_export, tmp_path):
    for path in default_export.iterdir():
        if path.name != "manifest.json" and not path.name.startswith("transformer_"):
            (tmp_path / path.name).symlink_to(path)
    data = json.loads((default_export / "manifest.json").read_text())
    for files in [data["files"], *data["variants"].values()]:
        for part in TRANSFORMER_PARTS:
            files.pop(part, None)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert Engine.load(tmp_path).generate(request("fast", steps=4)).steps_computed > 0  # forecast needs none
    with pytest.raises(ValueError, match="--head-blocks"):
        Engine.load(tmp_path, step_cache_mechanism="blocks")
    with pytest.raises(ValueError, match="step_cache_mechanism"):
        Engine.load(default_export, step_cache_mechanism="psychic")
    shutil.rmtree(tmp_path)


# -- against diffusers' own FirstBlockCache ----------------------------------------------------------------------
def test_decisions_and_images_follow_diffusers_first_block_cache(blocks, default_checkpoint, monkeypatch):
    """diffusers' FirstBlockCache on the same weights and threshold (guidance 1: one row, which diffusers decides
    for as a batch), from the same initial latents: the same steps skip the remaining blocks, and the images agree
    as the engine and diffusers agree without caching."""
    from benchmarks.step_cache_diffusers import _pipeline, _with_first_block_cache, engine_latents

    threshold = 0.2
    # diffusers' rule alone: no forced last steps, no bound on skips in a row (the first step always computes)
    monkeypatch.setitem(BLOCK_POLICIES, "balanced", CachePolicy(threshold, first_steps=0, last_steps=0,
                                                                max_skips=10**6))
    pipe = _pipeline(default_checkpoint)
    reset = _with_first_block_cache(pipe, threshold)
    theirs: list[bool] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: theirs.append(False))
    # the hook replaces the skipped blocks' forward, so their own pre-hooks still fire: their attention's do not
    pipe.transformer.transformer_blocks[1].attn1.register_forward_pre_hook(lambda *_: theirs.__setitem__(-1, True))
    prompt, size = "a red circle on the left, a blue background", (256, 256)
    reset()
    image = pipe(prompt, height=size[1], width=size[0], num_inference_steps=20, guidance_scale=1.0,
                 latents=engine_latents(blocks.manifest, 5, *size), output_type="np").images[0]
    reference = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    g = blocks.prepare(dataclasses.replace(request("balanced", guidance=1.0, seed=5), prompt=prompt))
    ours = []
    while not g.done:
        before = g.steps_computed
        blocks.step([g])
        ours.append(g.steps_computed > before)
    (result,) = blocks.finish([g])
    assert ours == theirs and 4 < theirs.count(False) < 16, (ours, theirs)
    assert psnr(result.images[0].pixels, reference) > 60  # measured 81-85 dB over 8 seeds
