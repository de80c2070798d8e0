"""OpenAI's Images API on the HTTP port (`POST /v1/images/generations`, `GET /v1/models`), so that code written for
it works here by `base_url` alone: an adapter over the request service, like gRPC and fal's routes (the same queue,
keys, limits and policies).

The request: `prompt`; `model` (`pixart-sigma` or a served app id); `n` (1-8); `size` (`WxH` within the engine's
limits, binned to the model's aspect ratios as usual, or `auto`: 1024x1024); `response_format` (`b64_json`, the
default, or `url`: the server's signed result URLs); `quality` (a step count, schema.QUALITY_STEPS); `output_format`;
`style` (OpenAI's `vivid`/`natural` are accepted and ignored; one of fal's style names picks that style); `user`,
`background` (`auto`/`opaque`; `transparent` is refused), `moderation` and `output_compression` are accepted and
ignored. Extensions: `negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`, `scheduler`,
`enable_safety_checker`, `step_cache`. `stream: true` answers server-sent events: `image_generation.partial_image`
(`partial_images`, 0-3, previews of the first image as it forms) then one `image_generation.completed` per image.

Errors are OpenAI's: `{"error": {"message", "type", "param", "code"}}`, 400 naming the field, 401, 429 past a key's
limit or when the queue is full, 503 when the server cannot take work now (both with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.request import GenerationRequest, GenerationResult, InvalidRequest
from engine.vocabulary import MAX_SIDE, MIN_SIDE, OUTPUT_FORMATS, STYLE_NAMES
from protos.pixart.v1 import pixart_pb2 as pb
from server.api.http import schema
from server.api.http.bodies import BodyRefused, ClientGone, integral, read_json, unless_gone
from server.api.keys import ApiKeys
from server.api.limits import RETRY_AFTER_S
from server.core import records
from server.core.service import Call, Requests
from server.core.work import Done, Previewed, QueueFull, TenantLimit, Unavailable

MODEL = "pixart-sigma"
OPENAI_STYLES = ("vivid", "natural")
MAX_PARTIAL_IMAGES = 3
# extension field -> the JSON types it may have
EXTENSIONS: dict[str, tuple[type, ...]] = {
    "negative_prompt": (str,), "num_inference_steps": (int,), "guidance_scale": (int, float), "seed": (int,),
    "scheduler": (str,), "enable_safety_checker": (bool,), "step_cache": (str,),
}


class Refused(Exception):
    """An OpenAI-shaped refusal."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def answer(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else None
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, self.status, headers=headers)


def parse_size(size: Any) -> tuple[int, int]:
    """(width, height) of `WIDTHxHEIGHT` (each side MIN_SIDE..MAX_SIDE) or auto (1024x1024): schema.SIZE_PATTERN, the
    document's own rule."""
    if size is None or size == "auto":
        return 1024, 1024
    if not isinstance(size, str) or re.fullmatch(schema.SIZE_PATTERN, size) is None:
        raise Refused(400, f"size must be WIDTHxHEIGHT with each side from {MIN_SIDE} to {MAX_SIDE} (for example "
                      "1024x768), or auto", "size", "invalid_size")
    width, _, height = size.partition("x")
    return int(width), int(height)


class OpenAIRequest:
    """An Images API body, judged: the engine request, and how to answer it."""

    def __init__(self, body: Any, models: set[str]):
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object", None, "invalid_body")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise Refused(400, "prompt is required (a string)", "prompt", "missing_required_parameter")
        model = body.get("model")
        if model is None:
            model = MODEL
        if not isinstance(model, str) or model not in models:
            raise Refused(400, f"model must be one of {', '.join(sorted(models))}", "model", "model_not_found")
        self.response_format = self._choice(body, "response_format", ("b64_json", "url"), "b64_json")
        self.quality = self._choice(body, "quality", tuple(schema.QUALITY_STEPS), "auto")
        self.output_format = self._choice(body, "output_format", OUTPUT_FORMATS, "png")
        self._choice(body, "background", ("auto", "opaque"), "auto")
        self._choice(body, "moderation", ("low", "auto"), "auto")  # accepted, ignored
        if len(self._typed(body, "user", (str,), "")) > 256:  # accepted, ignored
            raise Refused(400, "user must be at most 256 characters", "user", "invalid_value")
        if not 0 <= self._typed(body, "output_compression", (int,), 0) <= 100:  # accepted, ignored
            raise Refused(400, "output_compression must be from 0 to 100", "output_compression", "invalid_value")
        style = self._choice(body, "style", OPENAI_STYLES + STYLE_NAMES, "natural")
        self.stream = self._typed(body, "stream", (bool,), False)
        self.partial_images = self._typed(body, "partial_images", (int,), 0)
        if not 0 <= self.partial_images <= MAX_PARTIAL_IMAGES:
            raise Refused(400, f"partial_images must be from 0 to {MAX_PARTIAL_IMAGES}", "partial_images")
        n = self._typed(body, "n", (int,), 1)
        width, height = parse_size(body.get("size"))
        self.size = f"{width}x{height}"
        extra = {name: self._typed(body, name, types, None) for name, types in EXTENSIONS.items()}
        steps = extra.pop("num_inference_steps")
        steps = schema.QUALITY_STEPS[self.quality] if steps is None else steps
        previews = max(1, steps // (self.partial_images + 1)) if self.stream and self.partial_images else 0
        self.generation = GenerationRequest(
            prompt=prompt, num_images=n, image_size=(width, height), num_inference_steps=steps,
            output_format=self.output_format, style=style if style in STYLE_NAMES else STYLE_NAMES[0],
            sync_mode=self.response_format == "b64_json", preview_every=previews,
            **{name: value for name, value in extra.items() if value is not None})

    @staticmethod
    def _typed(body: dict, name: str, types: tuple[type, ...], default: Any) -> Any:
        value = body.get(name)
        if value is None:
            return default
        if int in types and float not in types:
            value = integral(value)
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            kind = "a number" if float in types else {str: "a string", int: "an integer", bool: "a boolean"}[types[0]]
            raise Refused(400, f"{name} must be {kind}", name, "invalid_type")
        return value

    @classmethod
    def _choice(cls, body: dict, name: str, choices: tuple[str, ...], default: str) -> str:
        value = cls._typed(body, name, (str,), default)
        if value not in choices:
            raise Refused(400, f"{name} must be one of {', '.join(choices)}", name, "invalid_value")
        return value


class OpenAIApi:
    def __init__(self, service: Requests, *, keys: ApiKeys, app_ids: set[str]):
        self.service, self.keys = service, keys
        self.models = {MODEL, *app_ids}

    async def models_list(self, request: Request) -> Response:
        if not self.keys.allows(request.headers.get("authorization", "")):
            return _no_key().answer()
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "pixart-sigma-serve"}
            for model in sorted(self.models)]})

    async def generations(self, request: Request) -> Response:
        authorization = request.headers.get("authorization", "")
        try:
            if not self.keys.allows(authorization):
                raise _no_key()
            if (why := self.service.unavailable()) is not None:
                raise Refused(503, str(why), None, "service_unavailable", "server_error")
            asked = OpenAIRequest(await read_json(request), self.models)
            violations = self.service.violations(asked.generation)
            if violations:
                raise _invalid(violations)
            call = await self.service.start(asked.generation, method="openai", tenant=self.keys.tenant(authorization))
        except BodyRefused as refused:
            return Refused(refused.status if refused.status == 413 else 400, f"body {refused}", None,
                           "invalid_body").answer()
        except ClientGone:
            return Response(status_code=499)
        except Refused as refused:
            return refused.answer()
        except (InvalidRequest, TenantLimit, QueueFull, Unavailable) as exc:
            return _refusal(exc).answer()
        if asked.stream:
            return StreamingResponse(self._events(call, asked), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            outcome = await unless_gone(request, call.outcome())
        except ClientGone:  # free its place in the queue, or stop it at its next step
            call.cancel()
            return Response(status_code=499)
        if not isinstance(outcome, GenerationResult):
            return _failure(outcome).answer()
        result = self.service.result(call.item)
        return await asyncio.to_thread(lambda: JSONResponse(self._body(result, asked)))

    def _body(self, result: pb.GenerateResult, asked: OpenAIRequest) -> dict:
        data = [{"b64_json": base64.b64encode(img.file_data).decode(), "revised_prompt": None}
                if asked.response_format == "b64_json" else {"url": img.url, "revised_prompt": None}
                for img in result.images]
        return {"created": int(time.time()), "data": data, "background": "opaque", "output_format":
                asked.output_format, "quality": asked.quality, "size": asked.size}

    async def _events(self, call: Call, asked: OpenAIRequest) -> AsyncIterator[str]:
        """Partial images as they form, then each image; an error as OpenAI streams one. The caller leaving
        cancels the request."""
        sent, finished = 0, False
        common = {"background": "opaque", "quality": asked.quality, "size": asked.size}
        try:
            async for update in call.updates():
                if isinstance(update, Previewed) and sent < asked.partial_images:
                    event = {"type": "image_generation.partial_image", "b64_json": base64.b64encode(
                        update.data).decode(), "partial_image_index": sent, "created_at": int(time.time()),
                             "output_format": "jpeg", **common}
                    sent += 1
                    yield _sse(event)
                elif isinstance(update, Done):
                    finished = True
                    if not isinstance(update.outcome, GenerationResult):
                        refused = _failure(update.outcome)
                        yield _sse({"type": "error", "error": {"message": str(refused), "type": refused.kind,
                                                               "param": None, "code": refused.code}})
                        return
                    result = self.service.result(call.item)
                    for img in result.images:
                        yield _sse({"type": "image_generation.completed", "b64_json": base64.b64encode(
                            img.file_data).decode(), "created_at": int(time.time()),
                            "output_format": asked.output_format, "usage": _NO_TOKENS, **common})
        finally:
            if not finished:
                call.cancel()


# PixArt-Σ counts no tokens: the usage OpenAI's completed event requires, zeroed
_NO_TOKENS = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
              "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def _no_key() -> Refused:
    return Refused(401, "a valid API key is required (Authorization: Bearer <key>)", None, "invalid_api_key")


# the engine's field names as this API spells them
PARAMS = {"num_images": "n", "image_size": "size", "preview_every": "partial_images", "sync_mode": "response_format"}


def _invalid(violations: list[tuple[str, str]]) -> Refused:
    """400 naming the first bad field in this API's words (how many more there are, too)."""
    field, rule = violations[0]
    param = PARAMS.get(field.split(".")[0], field.split(".")[0])
    more = f" (and {len(violations) - 1} more)" if violations[1:] else ""
    return Refused(400, f"{param}: {rule}{more}", param, "invalid_value")


def _refusal(exc: Exception) -> Refused:
    if isinstance(exc, InvalidRequest):
        return _invalid(exc.violations)
    if isinstance(exc, TenantLimit):
        return Refused(429, str(exc), None, "rate_limit_exceeded", "requests")
    if isinstance(exc, QueueFull):  # OpenAI's clients retry a 429 after Retry-After by themselves
        return Refused(429, "the queue is full; retry later", None, "queue_full", "requests")
    return Refused(503, str(exc), None, "service_unavailable", "server_error")


def _failure(outcome: BaseException) -> Refused:
    status = records.outcome_status(outcome)
    if records.violations_from_status(status):
        return _invalid(records.violations_from_status(status))
    return Refused(500, status.message[:1000], None, records.grpc_code(status).name.lower(), "server_error")


def mount(api: OpenAIApi, app: FastAPI) -> None:
    """Add the Images API's routes, documented, to the HTTP port's app."""
    body = schema.body_schemas(schema.OpenAIImageRequest)
    body["OpenAIImageRequest"]["properties"]["model"] = {"anyOf": [{"type": "string", "enum": sorted(api.models)},
                                                                    {"type": "null"}], "default": MODEL}
    app.state.body_schemas.update(body)
    security = {"security": [{"bearer": []}, {"apiKey": []}]} if api.keys.required else {}
    error = {"model": schema.OpenAIError, "description": ""}
    events = {"description": "with stream: image_generation.partial_image events, then image_generation.completed",
              "content": {"text/event-stream": {"itemSchema": {"type": "object", "required": ["data"],
                                                               "properties": {"data": {"type": "string"}}}}}}
    images = {"model": schema.ImagesResponse, "description": "the images (b64_json, or signed URLs)"}
    app.add_api_route(
        "/v1/images/generations", api.generations, methods=["POST"], operation_id="openai_images_generate",
        summary="Generate images (OpenAI's Images API)",
        responses={200: {**images, "content": events["content"]}, 400: {**error, "description": "a bad field"},
                   401: {**error, "description": "no valid key"}, 413: {**error, "description": "body too large"},
                   429: {**error, "description": "past this key's limit, or the queue is full"},
                   500: {**error, "description": "the generation failed"},
                   503: {**error, "description": "the server cannot take work now (starting, draining, store away)"}},
        openapi_extra={**security, "requestBody": schema.body(schema.OpenAIImageRequest)})
    app.add_api_route("/v1/models", api.models_list, methods=["GET"], operation_id="openai_models",
                      summary="The models this server serves", openapi_extra=security,
                      responses={200: {"model": schema.ModelList, "description": ""},
                                 401: {**error, "description": "no valid key"}})
