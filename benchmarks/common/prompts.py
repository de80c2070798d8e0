"""The prompts the benchmarks generate from: the same text on every side, so that figures compare."""

from __future__ import annotations

PROMPTS = (
    "a small red fox sitting in fresh snow, 35mm photo",
    "an old lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen with steam rising, studio lighting",
    "a robot reading a newspaper in a quiet cafe",
)
NEGATIVE = "blurry, low quality"
