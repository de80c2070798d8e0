"""The embedded default draws what it is asked: prompts it never saw as a whole, generated through the engine the
way a caller would, and read back from the pixels by export.scenes' scorer.

The figures asserted are those measured on the committed weights (the README's table, `python -m
export.evaluate_default DIR`) less a margin; generation is deterministic for a seed on one machine, and the margin
absorbs float differences between CPUs and ONNX Runtime builds.
"""

from __future__ import annotations

import pytest

from engine import GenerationRequest
from engine.vocabulary import SCHEDULERS
from export import scenes
from export.evaluate_default import evaluate

pytestmark = pytest.mark.slow  # 4 x 36 generations

# Measured on the committed weights, per (sampler, guidance): the share of the 36 held-out prompts read back right.
# (colour, position, background, all three) out of 36, as `python -m export.evaluate_default` printed them.
MEASURED = {("DPM-SOLVER", 1.0): dict(zip(scenes.ATTRIBUTES, (23 / 36, 34 / 36, 36 / 36, 22 / 36), strict=True)),
            ("DPM-SOLVER", 4.5): dict(zip(scenes.ATTRIBUTES, (13 / 36, 26 / 36, 28 / 36, 9 / 36), strict=True)),
            ("SA-SOLVER", 1.0): dict(zip(scenes.ATTRIBUTES, (17 / 36, 32 / 36, 36 / 36, 16 / 36), strict=True)),
            ("SA-SOLVER", 4.5): dict(zip(scenes.ATTRIBUTES, (11 / 36, 25 / 36, 23 / 36, 5 / 36), strict=True))}
MARGIN = 0.12  # about 4 of 36 prompts


@pytest.fixture(scope="module")
def accuracy(engine) -> dict[tuple[str, float], dict[str, float]]:
    return {(sampler, guidance): evaluate(engine, guidance, sampler)
            for sampler in SCHEDULERS for guidance in (1.0, 4.5)}


@pytest.mark.parametrize("guidance", (1.0, 4.5))
@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_held_out_prompts_are_drawn_as_asked(accuracy, sampler, guidance):
    measured, got = MEASURED[(sampler, guidance)], accuracy[(sampler, guidance)]
    for attribute in scenes.ATTRIBUTES:
        assert got[attribute] >= measured[attribute] - MARGIN, (attribute, got)


def test_the_readme_prompt(engine):
    # `pixart generate "a red circle on a blue background" --guidance-scale 1.5`: square_hd (1024², computed at
    # 256² and resized back), 35 DPM-Solver steps; a few seeds, since a caller's is random. Guidance above ~2
    # over-saturates this tiny model (see the README), hence 1.5 and not the service's 4.5.
    for seed in range(4):
        request = GenerationRequest(prompt="a red circle on a blue background", seed=seed, guidance_scale=1.5)
        picture = engine.generate(request).images[0].pixels
        assert picture.shape == (1024, 1024, 3)
        reading = scenes.read_picture(picture)
        assert (reading.colour, reading.background) == ("red", "blue"), (seed, reading)


def test_the_service_default_guidance_keeps_the_background(engine):
    # at the service's default guidance (4.5) the object's colour suffers (measured above) but not the scene
    for seed in range(4):
        picture = engine.generate(GenerationRequest(prompt="a red circle on a blue background", seed=seed)).images[0]
        assert scenes.read_picture(picture.pixels).background == "blue", seed
