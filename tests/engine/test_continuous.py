"""Continuous batching, proved on the engine's stages: a request's image does not depend on who it ran with.

Requests join a running batch at step 0, 1 or k and leave it when they are done (or are dropped), in batches that
mix step counts, guidance scales (guided and unguided rows), prompt lengths (text buckets of 32 and 96 tokens),
image counts and both samplers. Each request's images must equal the images of the same request run alone
(max difference 1/255), on the embedded default model and on the `small` config (real widths).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine import GenerationRequest

LONG_PROMPT = ("a lighthouse on a rocky cliff at dusk with waves crashing below, seagulls circling the lamp, "
               "a small red boat in the harbour, warm light in the windows of the keeper's cottage, clouds "
               "drifting across a violet sky, wet stones shining, a winding path up the hill")


def run_schedule(engine, requests: list[GenerationRequest], joins: list[int], drop: dict[int, int] | None = None):
    """Step one shared batch: request i joins once the batch has run joins[i] iterations; drop[i] = iteration at
    which request i is taken out unfinished. Returns each request's result (None when dropped)."""
    drop = drop or {}
    waiting, running, results = list(range(len(requests))), {}, [None] * len(requests)
    iteration = 0
    while waiting or running:
        for i in [i for i in waiting if joins[i] <= iteration]:
            running[i] = engine.prepare(requests[i])
            waiting.remove(i)
        for i in [i for i in running if drop.get(i) == iteration]:
            del running[i]
        if running:
            engine.step(list(running.values()))
        iteration += 1
        for i, g in list(running.items()):
            if g.done:
                (results[i],) = engine.finish([g])
                del running[i]
    return results


def pixels(result) -> np.ndarray:
    return np.stack([im.pixels for im in result.images]).astype(int)


def companions(size, other_sampler: str) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt="a blue square", seed=21, num_inference_steps=3, guidance_scale=1.0,
                          image_size=size),  # unguided, short, leaves early
        GenerationRequest(prompt=LONG_PROMPT, negative_prompt="blurry", seed=22, num_inference_steps=9,
                          guidance_scale=7.0, num_images=2, image_size=size),  # long text, two images, runs longer
        GenerationRequest(prompt="a green star", seed=23, num_inference_steps=5, scheduler=other_sampler,
                          guidance_scale=3.0, image_size=size),  # the other sampler
    ]


SCHEDULES = {
    "all at step 0": [0, 0, 0, 0],
    "joins at step 1": [1, 0, 0, 0],
    "joins at step k": [4, 0, 1, 2],
    "others join later": [0, 2, 3, 5],
}


def assert_independent(engine, size, sampler: str, schedules: tuple[str, ...] = tuple(SCHEDULES)) -> None:
    """Every request of every schedule (the subject with `sampler`, a companion with the other one) equals itself
    run alone."""
    subject = GenerationRequest(prompt="a red circle on a blue background", seed=7, num_inference_steps=6,
                                scheduler=sampler, guidance_scale=4.5, image_size=size)
    others = companions(size, "DPM-SOLVER" if sampler == "SA-SOLVER" else "SA-SOLVER")
    alone = pixels(engine.generate(subject))
    others_alone = [pixels(engine.generate(r)) for r in others]
    everyone = [subject, *others]
    for name in schedules:
        results = run_schedule(engine, everyone, SCHEDULES[name])
        for request, result, reference in zip(everyone, results, [alone, *others_alone], strict=True):
            diff = np.abs(pixels(result) - reference).max()
            assert diff <= 1, (name, request.prompt[:20], diff)
    # a companion dropped mid-run (cancelled) leaves the others as they were
    results = run_schedule(engine, everyone, [0, 0, 0, 0], drop={2: 2})
    assert results[2] is None
    assert np.abs(pixels(results[0]) - alone).max() <= 1


@pytest.mark.parametrize("sampler", ["DPM-SOLVER", "SA-SOLVER"])
def test_join_and_leave_change_nothing_on_the_default_model(engine, sampler):
    assert_independent(engine, (256, 256), sampler)


def test_rows_of_different_bins_cannot_share_a_step(engine):
    a = engine.prepare(GenerationRequest(prompt="a", seed=1, image_size=(256, 256)))
    b = engine.prepare(GenerationRequest(prompt="b", seed=1, image_size=(512, 256)))
    with pytest.raises(ValueError, match="size bin"):
        engine.step([a, b])


def test_generate_is_prepare_step_finish(engine):
    request = GenerationRequest(prompt="a yellow ring", seed=3, num_inference_steps=4, image_size=(256, 256))
    g = engine.prepare(request)
    assert (g.step_index, g.total_steps, g.done) == (0, 4, False)
    while not g.done:
        engine.step([g])
    (staged,) = engine.finish([g])
    np.testing.assert_array_equal(pixels(staged), pixels(engine.generate(request)))
    again = engine.prepare(dataclasses.replace(request))
    with pytest.raises(ValueError, match="finished"):
        for _ in range(5):
            engine.step([again])


@pytest.fixture(scope="module")
def small_engine(small_export):
    from engine import Engine

    return Engine.load(small_export)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_join_and_leave_change_nothing_on_the_small_config(small_engine):
    # One pass covers both samplers (the subject runs DPM-Solver, a companion SA-Solver, and every request is
    # compared with itself alone); two schedules keep the real-width VAE decodes few.
    assert_independent(small_engine, (256, 256), "DPM-SOLVER", schedules=("joins at step k", "others join later"))
