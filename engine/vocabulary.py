"""The public API's vocabulary, written once: styles, samplers, output formats, size presets, limits and defaults,
and the names of result files.

Everything else (the request dataclass, the proto tables in server/core/records.py, both command lines, the result
store) derives its names, choices and defaults from here.
"""

from __future__ import annotations

# width x height, as the public API spells them
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
STYLE_NAMES = (
    "(No style)",
    "Cinematic",
    "Photographic",
    "Anime",
    "Manga",
    "Digital Art",
    "Pixel art",
    "Fantasy art",
    "Neonpunk",
    "3D Model",
)
SCHEDULERS = ("DPM-SOLVER", "SA-SOLVER")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# how each format is written: MIME type, Pillow format and options, file extension
FORMAT_DETAILS: dict[str, tuple[str, str, dict, str]] = {
    "png": ("image/png", "PNG", {"compress_level": 4}, "png"),
    "jpeg": ("image/jpeg", "JPEG", {"quality": 95}, "jpg"),
    "webp": ("image/webp", "WEBP", {"quality": 95}, "webp"),
}
# step caching (engine/step_cache.py): "off" computes every step; the others skip a row's transformer call on steps
# where its output is predicted to barely change, "fast" more eagerly than "balanced"
STEP_CACHE_MODES = ("off", "balanced", "fast")
# how a row skips (engine/step_cache.py): "forecast" skips the whole transformer call and forecasts the model's
# output; "blocks" runs the first block(s) every step and skips the rest (first-block-residual caching)
STEP_CACHE_MECHANISMS = ("forecast", "blocks")
FLAGGED_IMAGE_MODES = ("black", "blur")  # what happens to an image the safety checker flags

DEFAULT_STYLE = STYLE_NAMES[0]
DEFAULT_IMAGE_SIZE = "square_hd"
DEFAULT_STEPS = 35
DEFAULT_SCHEDULER = SCHEDULERS[0]
DEFAULT_GUIDANCE = 4.5
DEFAULT_FORMAT = OUTPUT_FORMATS[0]
DEFAULT_STEP_CACHE = STEP_CACHE_MODES[0]
DEFAULT_STEP_CACHE_MECHANISM = STEP_CACHE_MECHANISMS[0]

MAX_PROMPT_CHARS = 10_000
MIN_SIDE, MAX_SIDE = 256, 2048
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_IMAGES = 8
MAX_SEED = 2**63 - 1
MAX_SEQUENCE_LENGTH = 300  # T5 tokens the pipeline reads, as diffusers' PixArt-Σ pipeline does


def parse_image_size(text: str) -> str | tuple[int, int]:
    """A preset name as given, or "WIDTHxHEIGHT" (x or X) as (width, height); validation happens elsewhere."""
    width, sep, height = text.strip().lower().partition("x")
    if sep and width.strip().isdigit() and height.strip().isdigit():
        return int(width), int(height)
    return text.strip()


def result_file_name(index: int, output_format: str) -> str:
    """The file name of a request's `index`-th image (from 0) in an output format: image_<index>.<extension>."""
    return f"image_{index}.{FORMAT_DETAILS[output_format][3]}"


# Every name the engine can give: an index below MAX_IMAGES, an extension of FORMAT_DETAILS.
_RESULT_FILE_NAMES = frozenset(
    result_file_name(index, output_format) for index in range(MAX_IMAGES) for output_format in FORMAT_DETAILS
)


def is_result_file_name(name: object) -> bool:
    """Whether `name` is a file name `result_file_name` can make, and nothing else (False for what is not a str)."""
    return isinstance(name, str) and name in _RESULT_FILE_NAMES


def result_file_names() -> frozenset[str]:
    """Every file name `result_file_name` can make (the HTTP port's document lists them)."""
    return _RESULT_FILE_NAMES
