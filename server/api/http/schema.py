"""The HTTP port's OpenAPI document: fal's wire format as pydantic models, written from the engine's vocabulary.

The models describe; they do not validate. Every route reads its own bounded body and the service's rules answer
(422 naming each bad field, in fal's shape), so the document and the behaviour are kept equal by the schema-driven
fuzz test (tests/server/integration/test_http_fuzz.py), which sends what this document allows and what it forbids.
Names, choices, limits and defaults all come from engine/vocabulary.py, so a new style or limit reaches the document
without an edit here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

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
    result_file_names,
)

REF = "#/components/schemas/{model}"
# What `Authorization` carries where API keys are configured (fal's clients send `Key <key>`)
SECURITY = {"apiKey": {"type": "apiKey", "in": "header", "name": "Authorization",
                       "description": "`Key <key>` where the server has API keys (--api-keys-file)"},
            "bearer": {"type": "http", "scheme": "bearer", "description": "the same key, as OpenAI's clients send it"}}


def _choice(names: tuple[str, ...] | list[str]) -> Any:
    return Literal[tuple(names)]  # type: ignore[valid-type]


class ImageSize(BaseModel):
    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE)


class FalInput(BaseModel):
    """fal's PixArt-Σ input. A field given as null takes its default; fields not listed here are ignored."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S",
                        description="what to draw (not blank)")
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    style: _choice(STYLE_NAMES) | None = DEFAULT_STYLE
    image_size: _choice(list(IMAGE_SIZE_PRESETS)) | ImageSize | None = Field(
        DEFAULT_IMAGE_SIZE, description="a preset, or {width, height}; binned to the model's nearest aspect ratio")
    num_inference_steps: int | None = Field(DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    scheduler: _choice(SCHEDULERS) | None = DEFAULT_SCHEDULER
    guidance_scale: float | None = Field(DEFAULT_GUIDANCE, ge=0, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent; always reported back")
    num_images: int | None = Field(1, ge=1, le=MAX_IMAGES)
    enable_safety_checker: bool | None = False
    sync_mode: bool | None = Field(False, description="images as data: URIs in the result instead of URLs")
    output_format: _choice(OUTPUT_FORMATS) | None = DEFAULT_FORMAT
    step_cache: _choice(STEP_CACHE_MODES) | None = Field(
        None, description="skip transformer calls on steps that barely change the image (default: the server's)")
    preview_every: int | None = Field(0, ge=0, le=MAX_STEPS, description="extension: a preview of the first image "
                                      "every this many steps on the status stream (0: none)")


class QueueSubmitted(BaseModel):
    status: Literal["IN_QUEUE"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int
    gateway_request_id: str | None = None


class LogLine(BaseModel):
    message: str
    level: Literal["INFO", "WARN", "ERROR", "DEBUG"]
    source: str
    timestamp: str


class RunMetrics(BaseModel):
    inference_time: float


class Preview(BaseModel):
    """The first image as it forms: the step's data estimate drawn without the VAE (a small JPEG)."""

    step: int
    total_steps: int
    content_type: str
    url: str = Field(description="a data: URI")


class Progress(BaseModel):
    step: int
    total_steps: int


class QueueStatus(BaseModel):
    """202 while queued or running, 200 once done: fal has no FAILED state, so an error is a COMPLETED status
    carrying `error` and `error_type`."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = None
    logs: list[LogLine] | None = None
    metrics: RunMetrics | None = None
    error: str | None = None
    error_type: str | None = None
    progress: Progress | None = Field(None, description="extension: steps done while it runs")
    preview: Preview | None = Field(None, description="extension, with preview_every: the latest preview")


class Image(BaseModel):
    url: str = Field(description="a signed, expiring URL; a data: URI with sync_mode")
    width: int
    height: int
    content_type: str
    file_name: str
    file_size: int


class FalOutput(BaseModel):
    images: list[Image]
    timings: dict[str, float]
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str


class CancelAnswer(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class Detail(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class FieldErrors(BaseModel):
    """422: every bad field, each named by its path (`["body", "image_size", "width"]`)."""

    detail: list[FieldError]


def json_of(model: type[BaseModel], description: str) -> dict:
    return {"model": model, "description": description}


def text(description: str) -> dict:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


UNAVAILABLE = {"model": Detail, "description": "the server cannot take this now (queue full, store unreachable, "
                                                "starting or draining); retry after Retry-After seconds"}
LIMITED = {"model": Detail, "description": "past this key's own limit; retry after Retry-After seconds"}
REFUSED = {401: json_of(Detail, "a valid API key is required"), 404: json_of(Detail, "no such app or request"),
           503: UNAVAILABLE}
INVALID = {"model": Detail | FieldErrors, "description": "a field broke its rule: each is named"}


def event_of(model: type[BaseModel]) -> dict:
    """One server-sent event whose data is `model` as JSON."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"$ref": REF.format(model=model.__name__)}}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def parameter(name: str, where: str, schema: dict, *, required: bool = False, description: str = "") -> dict:
    found = {"name": name, "in": where, "required": required or where == "path", "schema": schema}
    return {**found, "description": description} if description else found


def body(model: type[BaseModel]) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}


REQUEST_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
RESULT_FILE_NAME = {"type": "string", "enum": sorted(result_file_names())}


def body_schemas(model: type[BaseModel]) -> dict[str, dict]:
    """A request body's component schemas (FastAPI sees only the responses: the routes read bodies themselves)."""
    schema = model.model_json_schema(ref_template=REF)
    nested = schema.pop("$defs", {})
    return {model.__name__: schema, **nested}


# -- OpenAI's Images API (server/api/http/openai.py) ---------------------------------------------------------------
_SIDE = "(25[6-9]|2[6-9][0-9]|[3-9][0-9]{2}|1[0-9]{3}|20[0-3][0-9]|204[0-8])"  # MIN_SIDE..MAX_SIDE, no zeros first
SIZE_PATTERN = f"^(auto|{_SIDE}x{_SIDE})$"
assert (MIN_SIDE, MAX_SIDE) == (256, 2048), "SIZE_PATTERN spells the side limits"
# OpenAI's quality names as step counts (num_inference_steps overrides): auto is the engine's default
QUALITY_STEPS = {"low": 14, "medium": 20, "standard": 20, "auto": DEFAULT_STEPS, "high": 35, "hd": 50,
                 "xhigh": 50, "max": 50}


class OpenAIImageRequest(BaseModel):
    """OpenAI's image generation body; fields as OpenAI's, ours as extensions. null takes the default."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")
    model: str | None = Field("pixart-sigma", description="pixart-sigma, or a served app id")
    n: int | None = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field("auto", pattern=SIZE_PATTERN, description="WIDTHxHEIGHT or auto (1024x1024)")
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    quality: _choice(tuple(QUALITY_STEPS)) | None = Field(
        "auto", description="a step count: low 14, medium/standard 20, auto/high 35, hd/xhigh/max 50")
    output_format: _choice(OUTPUT_FORMATS) | None = DEFAULT_FORMAT
    background: Literal["auto", "opaque"] | None = "auto"
    style: _choice(("vivid", "natural", *STYLE_NAMES)) | None = Field(
        "natural", description="vivid and natural are accepted and ignored; a style name picks that style")
    user: str | None = Field(None, max_length=256, description="accepted, ignored")
    moderation: Literal["low", "auto"] | None = Field("auto", description="accepted, ignored")
    output_compression: int | None = Field(None, ge=0, le=100, description="accepted, ignored")
    stream: bool | None = False
    partial_images: int | None = Field(0, ge=0, le=3, description="with stream: previews of the first image")
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="overrides quality")
    guidance_scale: float | None = Field(DEFAULT_GUIDANCE, ge=0, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    scheduler: _choice(SCHEDULERS) | None = DEFAULT_SCHEDULER
    enable_safety_checker: bool | None = False
    step_cache: _choice(STEP_CACHE_MODES) | None = None


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    background: str
    output_format: str
    quality: str
    size: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
