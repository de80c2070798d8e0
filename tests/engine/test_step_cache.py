"""Step caching: rows that skip stay out of the transformer call, "off" is the engine without caching, a cached
request's image does not depend on its companions, and each row's history is bounded and freed.

Quality is measured in benchmarks/step_cache_quality.py (the README's table); the bounds here are far below what
it measured, so that they fail when caching breaks, not when a threshold is tuned.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from benchmarks.common.images import psnr
from engine import GenerationRequest
from engine.step_cache import ARRAYS_PER_ROW, POLICIES, CachePolicy, RowCache, step_cache_for
from tests.engine.test_continuous import SCHEDULES, pixels, run_schedule

SIZE = (256, 256)


def request(mode: str | None, *, sampler: str = "DPM-SOLVER", guidance: float = 4.5, steps: int = 20,
            seed: int = 7, images: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt="a red circle on a blue background", seed=seed, num_inference_steps=steps,
                             scheduler=sampler, guidance_scale=guidance, image_size=SIZE, step_cache=mode,
                             num_images=images)


def counting_rows(engine, monkeypatch) -> list[int]:
    """The rows of every transformer call the engine makes from now on."""
    calls: list[int] = []
    real = engine.predict_noise

    def predict_noise(x, *args, **kwargs):
        calls.append(len(x))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(engine, "predict_noise", predict_noise)
    return calls


# -- the mechanism, on plain arrays -----------------------------------------------------------------------------
def _identity(x, a):
    return a


def test_the_linear_forecast_is_exact_for_an_output_linear_in_the_timestep():
    row = RowCache(CachePolicy(threshold=1.0, forecast="linear", space="model"))
    x = np.ones((4, 2, 2), np.float32)
    for step, t in enumerate((900.0, 800.0)):
        row.record(x * step, t, np.full((4, 2, 2), t / 100, np.float32), step, _identity)
    np.testing.assert_allclose(row.forecast(x, 650.0, _identity), np.full((4, 2, 2), 6.5), rtol=1e-6)
    assert row.skipped == 1


def test_a_row_skips_only_inside_the_run_below_its_threshold_and_not_too_often():
    policy = CachePolicy(threshold=0.5, first_steps=0.2, last_steps=0.2, max_skips=2, criterion="input",
                         space="model")
    row = RowCache(policy)
    x0 = np.ones((4, 2, 2), np.float32)
    row.record(x0, 900.0, x0, 0, _identity)
    assert row.computes(x0 * 1.01, 1, 10), "a row with one computed step has nothing to forecast from"
    row.record(x0 * 1.1, 800.0, x0 * 1.1, 1, _identity)  # rate: 10% out per 10% in
    assert row.rate == pytest.approx(1.0)
    assert row.computes(x0 * 1.101, 1, 10), "inside the first steps"
    assert not row.computes(x0 * 1.2, 2, 10), "predicted change 0.09 is under 0.5"
    assert row.computes(x0 * 2.0, 2, 10), "predicted change 0.82 is over 0.5"
    assert row.computes(x0 * 1.2, 8, 10), "inside the last steps"
    row.forecast(x0, 700.0, _identity)
    row.forecast(x0, 600.0, _identity)
    assert row.computes(x0 * 1.2, 4, 10), "max_skips reached"


def test_a_guided_request_keeps_two_rows_per_image_and_off_keeps_none():
    assert step_cache_for("off", 2, True) is None
    cache = step_cache_for("fast", 2, True)
    assert len(cache.rows) == 4 and all(row.policy is POLICIES["fast"] for row in cache.rows)
    with pytest.raises(ValueError, match="step_cache"):
        step_cache_for("turbo", 1, False)


# -- the engine --------------------------------------------------------------------------------------------------
def test_off_is_the_engine_without_caching(engine, monkeypatch):
    calls = counting_rows(engine, monkeypatch)
    default, off = (engine.generate(request(mode, steps=8)) for mode in (None, "off"))
    np.testing.assert_array_equal(pixels(default), pixels(off))
    assert (off.steps_computed, off.steps_cached) == (16, 0)  # 8 steps of two rows
    assert calls == [2] * 16  # both requests: every step one call of both rows


@pytest.mark.parametrize("sampler", ["DPM-SOLVER", "SA-SOLVER"])
def test_rows_that_skip_stay_out_of_the_transformer_call(engine, monkeypatch, sampler):
    calls = counting_rows(engine, monkeypatch)
    result = engine.generate(request("fast", sampler=sampler))
    assert result.steps_cached > 0
    assert result.steps_computed + result.steps_cached == 40
    assert sum(calls) == result.steps_computed
    assert len(calls) < 20, "steps where every row skips make no call"
    assert set(calls) == {2}, "a guided image's halves compute or skip together"


@pytest.mark.parametrize(("mode", "bound"), [("balanced", 25), ("fast", 15)])
def test_a_cached_image_stays_close_to_the_exact_one(engine, mode, bound):
    # measured on this prompt at guidance 4.5: balanced 28.4 dB, fast 19.4 dB (the README's table has 36 prompts)
    exact = engine.generate(request("off")).images[0].pixels
    cached = engine.generate(request(mode)).images[0].pixels
    assert psnr(exact, cached) > bound


def test_the_engine_default_applies_to_requests_that_name_no_mode(default_export):
    from engine import Engine

    fast = Engine.load(default_export, step_cache="fast")
    try:
        assert fast.generate(request(None)).steps_cached > 0
        assert fast.generate(request("off")).steps_cached == 0
    finally:
        fast.close()
    with pytest.raises(ValueError, match="step_cache"):
        Engine.load(default_export, step_cache="turbo")


def test_a_rows_history_is_bounded_and_freed_when_it_finishes(engine):
    g = engine.prepare(request("fast", images=2))
    latent_bytes = g.latents[0].nbytes
    while not g.done:
        engine.step([g])
        if not g.done:
            assert g.cache.nbytes <= ARRAYS_PER_ROW * g.rows * latent_bytes
    assert g.cache is None


def test_bad_modes_are_named():
    assert ("step_cache", "must be one of off, balanced, fast") in request("turbo").violations()


def assert_independent_of_companions(engine, sampler: str) -> None:
    """The subject caches ("fast"); companions mix off, balanced and fast rows, guided and unguided, the other
    sampler, two images; each joins at step 0, 1 or k. Everyone equals itself alone, and makes the same decisions."""
    other = "DPM-SOLVER" if sampler == "SA-SOLVER" else "SA-SOLVER"
    subject = request("fast", sampler=sampler)
    everyone = [
        subject,
        dataclasses.replace(subject, prompt="a blue square", seed=21, num_inference_steps=3, guidance_scale=1.0,
                            step_cache="off"),
        dataclasses.replace(subject, prompt="a green star", seed=22, num_inference_steps=12, scheduler=other,
                            num_images=2, guidance_scale=3.0),
        dataclasses.replace(subject, prompt="a white ring", seed=23, num_inference_steps=9, step_cache="off"),
        dataclasses.replace(subject, prompt="a black cross", seed=24, num_inference_steps=10, step_cache="balanced"),
    ]
    alone = [engine.generate(r) for r in everyone]
    assert alone[0].steps_cached > 0 and alone[2].steps_cached > 0
    for name in ("all at step 0", "joins at step 1", "joins at step k"):
        results = run_schedule(engine, everyone, [*SCHEDULES[name], 2])
        for r, together, by_itself in zip(everyone, results, alone, strict=True):
            assert np.abs(pixels(together) - pixels(by_itself)).max() <= 1, (name, r.prompt)
            assert (together.steps_computed, together.steps_cached) == (by_itself.steps_computed,
                                                                        by_itself.steps_cached), (name, r.prompt)


@pytest.mark.parametrize("sampler", ["DPM-SOLVER", "SA-SOLVER"])
def test_a_cached_request_does_not_depend_on_its_companions(engine, sampler):
    assert_independent_of_companions(engine, sampler)


def test_caching_beside_the_device_step_matches_the_host_step(default_export):
    """With the step graph (the GPU default, here on the CPU provider) a bin whose rows cache steps on the host; an
    off request beside it is unchanged."""
    from engine import Engine

    host = Engine.load(default_export)
    device = Engine.load(default_export, io_binding=True, device_step=True)
    try:
        everyone = [request("fast"), dataclasses.replace(request("off"), seed=9, num_inference_steps=12)]
        for schedule in ([0, 0], [0, 3], [5, 0]):
            on_host = run_schedule(host, everyone, schedule)
            on_device = run_schedule(device, everyone, schedule)
            for a, b in zip(on_host, on_device, strict=True):
                assert np.abs(pixels(a) - pixels(b)).max() <= 1, schedule
                assert (a.steps_computed, a.steps_cached) == (b.steps_computed, b.steps_cached)
    finally:
        host.close()
        device.close()


def test_serve_and_infer_take_a_step_cache_mode(default_export, tmp_path, monkeypatch, capsys):
    from pixart_cli import build_parser, main
    from server.cli import config_from_args

    parser = build_parser()
    serve = ["serve", "--engine", str(default_export), "--store", str(tmp_path / "store")]
    assert config_from_args(parser.parse_args(serve)).engine_options["step_cache"] == "off"
    assert config_from_args(parser.parse_args([*serve, "--step-cache", "fast"])).engine_options["step_cache"] == "fast"
    assert config_from_args(parser.parse_args(serve)).engine_options["step_cache_mechanism"] == "forecast"
    blocks = config_from_args(parser.parse_args([*serve, "--step-cache-mechanism", "blocks"]))
    assert blocks.engine_options["step_cache_mechanism"] == "blocks"
    assert parser.parse_args(["infer", "x", "--engine", "e", "--step-cache-mechanism", "blocks"]).step_cache_mechanism \
        == "blocks"
    monkeypatch.setenv("PIXART_STEP_CACHE", "balanced")
    assert config_from_args(build_parser().parse_args(serve)).engine_options["step_cache"] == "balanced"
    with pytest.raises(SystemExit):
        parser.parse_args([*serve, "--step-cache", "turbo"])

    main(["infer", "a red circle", "--engine", str(default_export), "--out", str(tmp_path / "x.png"),
          "--image-size", "256x256", "--steps", "20", "--guidance-scale", "1", "--seed", "1", "--step-cache", "fast"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps_cached"] > 0 and printed["steps_computed"] + printed["steps_cached"] == 20
