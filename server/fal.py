"""fal's HTTP queue protocol on the HTTP port, so that fal's own clients (`fal-client`, `@fal-ai/client`) work here by
configuration alone. Same engine, queue, durable store, keys and webhook policy as gRPC.

Routes (`{app}` is `owner/name`, `fal-ai/pixart-sigma` by default, more with `--app-id`):

    POST /queue/{app}[/{subpath}]               submit (?fal_webhook=<url>); 200 IN_QUEUE + the request's URLs
    GET  /queue/{app}/requests/{id}/status      ?logs=1|0|true|false; 202 while queued or running, 200 when done
    GET  /queue/{app}/requests/{id}/status/stream   server-sent events: new log lines only, ends after COMPLETED
    GET  /queue/{app}/requests/{id}             the result (fal's output schema)
    PUT  /queue/{app}/requests/{id}/cancel      202 CANCELLATION_REQUESTED, 400 ALREADY_COMPLETED, 404 NOT_FOUND
    POST /run/{app}[/{subpath}]                 synchronous: the result on the same connection
    *    /fal/proxy                             routed by the x-fal-target-url header (queue.fal.run or fal.run)

fal has no FAILED or CANCELED state: such a request is COMPLETED with `error`/`error_type`, and its result answers
the error (422 with field details for invalid input). Cancel codes avoid 408, 409 and 429, which the Python client
retries. Every answer is JSON with `x-fal-request-id` when there is a request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from google.rpc import status_pb2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from engine.request import GenerationRequest, GenerationResult
from protos.pixart.v1 import pixart_pb2 as pb

from . import convert
from . import store as st
from .auth import key_matches, presented_key
from .batcher import Draining, QueueFull, WorkItem

if TYPE_CHECKING:
    from .app import App, Lookup

DEFAULT_APP_ID = "fal-ai/pixart-sigma"
QUEUE_HOST, RUN_HOST = "queue.fal.run", "fal.run"
KEEPALIVE_S = 15.0
MAX_BODY_BYTES = 1 << 20
LEVELS = {"INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR", "DEBUG": "DEBUG"}
# fal input field -> the JSON types it may have
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative_prompt": (str,), "style": (str,), "image_size": (str, dict),
    "num_inference_steps": (int,), "scheduler": (str,), "guidance_scale": (int, float), "seed": (int,),
    "num_images": (int,), "enable_safety_checker": (bool,), "sync_mode": (bool,), "output_format": (str,),
}


def _detail(violations: list[tuple[str, str]]) -> list[dict]:
    return [{"loc": ["body", *field.split(".")], "msg": rule, "type": "value_error"} for field, rule in violations]


def request_from_json(body: Any) -> tuple[GenerationRequest | None, list[tuple[str, str]]]:
    """fal's input schema -> a request, or every bad field (wrong types and broken rules alike). `sync_mode`
    defaults to false, as on fal."""
    if not isinstance(body, dict):
        return None, [("body", "must be a JSON object")]
    violations, kw = [], {"sync_mode": False}
    for name, types in FIELD_TYPES.items():
        value = body.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            kind = "number" if float in types else " or ".join(JSON_NAMES[t] for t in types)
            violations.append((name, f"must be a {kind}"))
            continue
        kw[name] = (value.get("width"), value.get("height")) if isinstance(value, dict) else value
    if "prompt" not in kw and not violations:
        violations.append(("prompt", "is required"))
    request = GenerationRequest(**{"prompt": "-", **kw})  # a placeholder prompt when it is missing or mistyped
    violations += [(f, rule) for f, rule in request.violations() if f in kw or f.split(".")[0] in kw]
    return (None if violations else request), violations


JSON_NAMES = {str: "string", dict: "{width, height} object", int: "integer", bool: "boolean"}


def _app_id(request: Request) -> str:
    return f"{request.path_params['owner']}/{request.path_params['name']}"


def _with_logs(request: Request) -> bool:
    """fal's JavaScript client sends logs=1|0, its Python client logs=true|false."""
    return request.query_params.get("logs", "0").lower() in ("1", "true")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _logs(lines: list[dict]) -> list[dict]:
    return [{"message": line["message"], "level": LEVELS.get(line.get("level", "INFO"), "INFO"), "source": "USER",
             "timestamp": _iso(line.get("timestamp", time.time()))} for line in lines]


class FalApi:
    def __init__(self, app: App, app_ids: list[str]):
        self.app = app
        self.app_ids = {DEFAULT_APP_ID, *app_ids}

    # -- shared -----------------------------------------------------------------------------------------------
    def _base(self, request: Request) -> str:
        if self.app.config.public_url:
            return self.app.config.public_url.rstrip("/")
        return f"{request.url.scheme}://{request.url.netloc}"

    def _urls(self, request: Request, app_id: str, request_id: str) -> dict[str, str]:
        url = f"{self._base(request)}/queue/{app_id}/requests/{request_id}"
        return {"response_url": url, "status_url": f"{url}/status", "cancel_url": f"{url}/cancel"}

    def _refusal(self, request: Request) -> Response | None:
        """401 without a valid key (when keys are configured), 404 for an app this server does not serve."""
        keys = self.app.config.api_keys
        if keys and not key_matches(presented_key(request.headers.get("authorization", "")), keys):
            return JSONResponse({"detail": "a valid API key is required (Authorization: Key <key>)"}, 401)
        app_id = _app_id(request)
        if app_id not in self.app_ids:
            return JSONResponse({"detail": "no such app on this server"}, 404)
        if self.app.engine is None or self.app.draining:
            return JSONResponse({"detail": "the server is starting or shutting down; retry shortly"}, 503)
        return None

    @staticmethod
    def _answer(body: Any, status: int = 200, request_id: str = "") -> JSONResponse:
        headers = {"x-fal-request-id": request_id} if request_id else None
        return JSONResponse(body, status, headers=headers)

    async def _input(self, request: Request) -> tuple[GenerationRequest | None, Response | None]:
        too_large = JSONResponse({"detail": "the request body is larger than 1 MB"}, 413)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return None, too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # bounded whatever Content-Length claimed
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return None, too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            return None, JSONResponse({"detail": _detail([("body", "is not valid JSON")])}, 422)
        generation, violations = request_from_json(body)
        if generation is not None:
            violations += [v for v in self.app.engine.violations(generation) if v not in violations]
        if violations:
            return None, JSONResponse({"detail": _detail(violations)}, 422)
        return generation, None

    def result_json(self, result: pb.GenerateResult, sync: bool, files: dict[str, bytes] | None = None) -> dict:
        images = []
        for img in result.images:
            url = img.url
            if sync:
                data = (files or {}).get(img.file_name, img.file_data)
                url = f"data:{img.content_type};base64,{base64.b64encode(data).decode()}"
            images.append({"url": url, "width": img.width, "height": img.height, "content_type": img.content_type,
                           "file_name": img.file_name, "file_size": img.file_size})
        t = result.timings
        timings = {"inference": t.total - t.queue, **{f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields}}
        return {"images": images, "timings": timings, "seed": result.seed,
                "has_nsfw_concepts": list(result.has_nsfw_concepts), "prompt": result.prompt}

    def stored_result_json(self, row: st.Row) -> dict:
        """A COMPLETED row as fal's output: data: URIs for sync_mode, signed URLs otherwise."""
        result = self.app.stored_result(row)
        sync = any(img.file_data for img in result.images)
        return self.result_json(result, sync)

    def status_json(self, request: Request, app_id: str, found: Lookup, with_logs: bool) -> tuple[dict, int]:
        state = found.state
        body: dict[str, Any] = {"request_id": found.request_id, **self._urls(request, app_id, found.request_id)}
        if state == st.IN_QUEUE:
            body.update(status="IN_QUEUE", queue_position=found.queue_position)
            return body, 202
        body["logs"] = _logs(found.logs) if with_logs else None
        if state == st.IN_PROGRESS:
            body["status"] = "IN_PROGRESS"
            return body, 202
        body["status"] = "COMPLETED"
        if state == st.COMPLETED and found.row is not None and found.row.result:
            timings = pb.GenerateResult.FromString(found.row.result).timings
            body["metrics"] = {"inference_time": timings.total - timings.queue}
        elif found.error is not None:
            body.update(error=found.error.message[:1000], error_type=convert.grpc_code(found.error).name)
        elif state == st.CANCELED:
            body.update(error="the request was cancelled", error_type="CANCELLED")
        return body, 200

    def error_answer(self, found: Lookup) -> tuple[dict, int]:
        """What a result request answers for a request that did not complete."""
        if found.state in (st.IN_QUEUE, st.IN_PROGRESS):
            return {"detail": "Request is still in progress"}, 400
        if found.state == st.CANCELED:
            return {"detail": "Request was cancelled"}, 400
        if found.error is not None and convert.violations_from_status(found.error):
            return {"detail": _detail(convert.violations_from_status(found.error))}, 422
        message = found.error.message[:1000] if found.error is not None else "the request failed"
        return {"detail": message}, 500

    # -- routes -----------------------------------------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        app_id = _app_id(request)
        webhook = request.query_params.get("fal_webhook", "")
        violations = self.app.webhook_policy.violations(webhook)
        generation, invalid = await self._input(request)
        if violations and invalid is None:
            return JSONResponse({"detail": _detail(violations)}, 422)
        if invalid is not None:
            return invalid
        try:
            rid, position = await self.app.submit(generation, webhook, origin="fal")
        except QueueFull:
            return JSONResponse({"detail": "the queue is full; retry later"}, 503)
        except Draining:
            return JSONResponse({"detail": "the server is shutting down"}, 503)
        body = {"status": "IN_QUEUE", "request_id": rid, **self._urls(request, app_id, rid),
                "queue_position": position}
        if webhook:
            body["gateway_request_id"] = rid
        return self._answer(body, 200, rid)

    async def _found(self, request: Request) -> tuple[str, Lookup | None, Response | None]:
        if (refused := self._refusal(request)) is not None:
            return "", None, refused
        rid = request.path_params["request_id"]
        found = await self.app.lookup(rid) if st.is_request_id(rid) else None
        if found is None:
            return rid, None, JSONResponse({"detail": "Request not found"}, 404)
        return rid, found, None

    async def status(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return answer
        app_id = _app_id(request)
        with_logs = _with_logs(request)
        body, code = self.status_json(request, app_id, found, with_logs)
        return self._answer(body, code, rid)

    async def status_stream(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return answer
        app_id = _app_id(request)
        with_logs = _with_logs(request)

        async def events():
            sent_logs, last, last_sent = 0, None, time.monotonic()
            while True:
                found = await self.app.lookup(rid)
                if found is None:
                    return
                body, _ = self.status_json(request, app_id, found, with_logs)
                if body.get("logs") is not None:  # only the lines not sent yet: the JS client appends them
                    body["logs"], sent_logs = body["logs"][sent_logs:], len(body["logs"])
                changed = (body["status"], body.get("queue_position")) != last or body.get("logs")
                if changed:
                    last, last_sent = (body["status"], body.get("queue_position")), time.monotonic()
                    yield f"data: {json.dumps(body)}\n\n"
                elif time.monotonic() - last_sent >= KEEPALIVE_S:
                    last_sent = time.monotonic()
                    yield ": keepalive\n\n"
                if body["status"] == "COMPLETED":
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-fal-request-id": rid, "Cache-Control": "no-cache"})

    async def result(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return answer
        if found.state != st.COMPLETED or found.row is None:
            body, code = self.error_answer(found)
            return self._answer(body, code, rid)
        return self._answer(await asyncio.to_thread(self.stored_result_json, found.row), 200, rid)

    async def cancel(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return self._answer({"status": "NOT_FOUND"}, 404) if answer.status_code == 404 else answer
        outcome = await self.app.cancel(rid)
        if outcome in ("queued", "running"):
            return self._answer({"status": "CANCELLATION_REQUESTED"}, 202, rid)
        if outcome == "ended":
            return self._answer({"status": "ALREADY_COMPLETED"}, 400, rid)
        return self._answer({"status": "NOT_FOUND"}, 404, rid)

    async def run(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        generation, invalid = await self._input(request)
        if invalid is not None:
            return invalid
        item = WorkItem(generation)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        item.listeners.append(lambda _i, event: event[0] == "done" and loop.call_soon_threadsafe(done.set))
        try:
            self.app.batcher.submit(item)
        except (QueueFull, Draining):
            return JSONResponse({"detail": "the queue is full or the server is shutting down; retry later"}, 503)
        try:
            await done.wait()
        except asyncio.CancelledError:  # the caller went away: free the place or the step
            self.app.batcher.cancel(item.id)
            raise
        if not isinstance(item.outcome, GenerationResult):
            status = convert.outcome_status(item.outcome)
            violations = convert.violations_from_status(status)
            if violations:
                return self._answer({"detail": _detail(violations)}, 422, item.id)
            return self._answer({"detail": status.message[:1000]}, 500, item.id)
        sync = generation.sync_mode
        urls = None if sync else [self.app.result_url(item.id, img.file_name) for img in item.outcome.images]
        result = convert.result_to_proto(item.outcome, item.id, queue_s=item.queue_s, urls=urls, include_data=sync)
        return self._answer(self.result_json(result, sync), 200, item.id)

    def webhook_payload(self, row: st.Row) -> dict:
        """fal's webhook body: {request_id, gateway_request_id, status: OK|ERROR, payload, error}."""
        body: dict[str, Any] = {"request_id": row.id, "gateway_request_id": row.id}
        if row.state == st.COMPLETED and row.result:
            return {**body, "status": "OK", "payload": self.stored_result_json(row), "error": None}
        from .app import Lookup

        error = status_pb2.Status.FromString(row.error) if row.error else None
        payload, code = self.error_answer(Lookup(row.id, row.state, error=error))
        return {**body, "status": "ERROR", "payload": payload, "error": f"Invalid status code: {code}"}

    # -- the proxy ----------------------------------------------------------------------------------------------
    def proxy(self, router: Callable[[Scope, Receive, Send], Awaitable[None]]) -> _Proxy:
        """An ASGI app answering fal's proxy mode locally: the path comes from x-fal-target-url."""
        return _Proxy(router)

    def routes(self) -> list[Route]:
        app = "/{owner}/{name}"
        requests = f"/queue{app}/requests/{{request_id}}"
        return [
            Route(f"{requests}/status/stream", self.status_stream, methods=["GET"]),
            Route(f"{requests}/status", self.status, methods=["GET"]),
            Route(f"{requests}/cancel", self.cancel, methods=["PUT"]),
            Route(requests, self.result, methods=["GET"]),
            Route(f"/queue{app}", self.submit, methods=["POST"]),
            Route(f"/queue{app}/{{subpath:path}}", self.submit, methods=["POST"]),
            Route(f"/run{app}", self.run, methods=["POST"]),
            Route(f"/run{app}/{{subpath:path}}", self.run, methods=["POST"]),
        ]


class _Proxy:
    """fal's proxy mode (`proxyUrl` in the JS client): every call arrives at one URL and names its real target in
    `x-fal-target-url`; only fal's queue and run hosts are accepted, and the call is answered here, never forwarded."""

    def __init__(self, router: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        target = headers.get("x-fal-target-url", "")
        parts = urlsplit(target) if len(target) <= 8192 else None
        prefix = {QUEUE_HOST: "/queue", RUN_HOST: "/run"}.get(parts.hostname if parts else None)
        if parts is None or parts.scheme != "https" or prefix is None:
            response = JSONResponse({"detail": "x-fal-target-url must be an https://queue.fal.run/... or "
                                               "https://fal.run/... URL"}, 400)
            await response(scope, receive, send)
            return
        path = prefix + (parts.path or "/")
        inner = dict(scope, path=path, raw_path=path.encode(), query_string=parts.query.encode())
        await self.router(inner, receive, send)
