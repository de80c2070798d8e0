"""What a caller asks for and what it gets back: the public request fields (docs/api.md), validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.vocabulary import (
    DEFAULT_FORMAT,
    DEFAULT_GUIDANCE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    DEFAULT_STYLE,
    IMAGE_SIZE_PRESETS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    OUTPUT_FORMATS,
    SCHEDULERS,
    STEP_CACHE_MODES,
    STYLE_NAMES,
)


class InvalidRequest(ValueError):
    """A request refused before any work: every violation names its field and the rule it broke."""

    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = violations
        super().__init__("; ".join(f"{f}: {rule}" for f, rule in violations))

    @property
    def field(self) -> str:
        return self.violations[0][0]


class Cancelled(Exception):
    """The caller asked to stop; raised at the next denoising step."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    style: str = DEFAULT_STYLE
    image_size: str | tuple[int, int] = DEFAULT_IMAGE_SIZE  # a preset name or (width, height)
    num_inference_steps: int = DEFAULT_STEPS
    scheduler: str = DEFAULT_SCHEDULER
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None  # None: a random seed, always reported back
    num_images: int = 1
    enable_safety_checker: bool = False
    sync_mode: bool = True  # a transport concern; the engine always returns bytes
    output_format: str = DEFAULT_FORMAT
    clean_caption: bool = True  # diffusers' default; off only to compare with pipelines that skip it
    # "off" (exact), "balanced" or "fast" (engine/step_cache.py); None: the engine's default (Engine(step_cache=))
    step_cache: str | None = None
    # a preview of the first image every this many steps (0: none): the data estimate drawn without the VAE
    preview_every: int = 0
    # Explicit initial latents (num_images, 4, H/8, W/8) at the binned size, for parity tests.
    latents: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels as requested (before binning)."""
        if isinstance(self.image_size, str):
            return IMAGE_SIZE_PRESETS[self.image_size]
        return int(self.image_size[0]), int(self.image_size[1])

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def violations(self) -> list[tuple[str, str]]:
        """Every broken rule, as (field, rule); empty when the request is valid."""
        v: list[tuple[str, str]] = []
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            v.append(("prompt", "must be a non-empty string"))
        elif len(self.prompt) > MAX_PROMPT_CHARS:
            v.append(("prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
        if not isinstance(self.negative_prompt, str):
            v.append(("negative_prompt", "must be a string"))
        elif len(self.negative_prompt) > MAX_PROMPT_CHARS:
            v.append(("negative_prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
        if self.style not in STYLE_NAMES:
            v.append(("style", f"must be one of {', '.join(STYLE_NAMES)}"))
        if isinstance(self.image_size, str):
            if self.image_size not in IMAGE_SIZE_PRESETS:
                v.append(("image_size", f"must be one of {', '.join(IMAGE_SIZE_PRESETS)} or {{width, height}}"))
        else:
            try:
                w, h = self.image_size
            except (TypeError, ValueError):
                v.append(("image_size", "must be a preset name or (width, height)"))
            else:
                for name, side in (("image_size.width", w), ("image_size.height", h)):
                    if not _is_int(side) or not MIN_SIDE <= side <= MAX_SIDE:
                        v.append((name, f"must be an integer from {MIN_SIDE} to {MAX_SIDE}"))
        if not _is_int(self.num_inference_steps) or not 1 <= self.num_inference_steps <= MAX_STEPS:
            v.append(("num_inference_steps", f"must be an integer from 1 to {MAX_STEPS}"))
        if self.scheduler not in SCHEDULERS:
            v.append(("scheduler", f"must be one of {', '.join(SCHEDULERS)}"))
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not _finite(g) or not 0 <= g <= MAX_GUIDANCE:
            v.append(("guidance_scale", f"must be a finite number from 0 to {MAX_GUIDANCE:g}"))
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            v.append(("seed", "must be an integer from 0 to 2^63-1"))
        if not _is_int(self.num_images) or not 1 <= self.num_images <= MAX_IMAGES:
            v.append(("num_images", f"must be an integer from 1 to {MAX_IMAGES}"))
        for name in ("enable_safety_checker", "sync_mode", "clean_caption"):
            if not isinstance(getattr(self, name), bool):
                v.append((name, "must be a boolean"))
        if self.output_format not in OUTPUT_FORMATS:
            v.append(("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}"))
        if not _is_int(self.preview_every) or not 0 <= self.preview_every <= MAX_STEPS:
            v.append(("preview_every", f"must be an integer from 0 (no previews) to {MAX_STEPS}"))
        if self.step_cache is not None and self.step_cache not in STEP_CACHE_MODES:
            v.append(("step_cache", f"must be one of {', '.join(STEP_CACHE_MODES)}"))
        return v

    def validate(self) -> GenerationRequest:
        """Raise InvalidRequest naming every bad field; return self when all is well."""
        v = self.violations()
        if v:
            raise InvalidRequest(v)
        return self


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float (JSON allows any number of digits)
        return False


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # (height, width, 3) uint8 RGB
    data: bytes  # encoded in `content_type`
    content_type: str
    file_name: str

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    seed: int
    prompt: str
    has_nsfw_concepts: list[bool]
    # seconds per stage: text_encoding, denoising, decoding, safety, image_encoding, total
    timings: dict[str, float]
    # transformer row-steps (a guided image is two rows a step): run through the model, and taken from the step
    # cache instead; computed + cached = steps x rows
    steps_computed: int = 0
    steps_cached: int = 0
