"""fal's HTTP queue protocol on the HTTP port, so that fal's own clients (`fal-client`, `@fal-ai/client`) work here by
configuration alone: an adapter over the request service, like gRPC (the same queue, store, keys and webhooks).

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
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from google.rpc import status_pb2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.preview import CONTENT_TYPE as PREVIEW_TYPE
from engine.request import GenerationRequest, GenerationResult, InvalidRequest
from protos.pixart.v1 import pixart_pb2 as pb
from server.api.http.bodies import BodyRefused, ClientGone, integral, read_json, unless_gone
from server.api.keys import ApiKeys
from server.api.limits import RETRY_AFTER_S
from server.core import records
from server.core.service import KEEPALIVE_S, Lookup, Requests
from server.core.work import QueueFull, TenantLimit, Unavailable
from server.storage import CANCELED, COMPLETED, IN_PROGRESS, IN_QUEUE, Row, StoreUnavailable, is_request_id

DEFAULT_APP_ID = "fal-ai/pixart-sigma"
LEVELS = {"INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR", "DEBUG": "DEBUG"}
# fal input field -> the JSON types it may have
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative_prompt": (str,), "style": (str,), "image_size": (str, dict),
    "num_inference_steps": (int,), "scheduler": (str,), "guidance_scale": (int, float), "seed": (int,),
    "num_images": (int,), "enable_safety_checker": (bool,), "sync_mode": (bool,), "output_format": (str,),
    "step_cache": (str,), "preview_every": (int,),
}


def _detail(violations: list[tuple[str, str]]) -> list[dict]:
    return [{"loc": ["body", *field.split(".")], "msg": rule, "type": "value_error"} for field, rule in violations]


def request_from_json(body: Any) -> tuple[GenerationRequest, list[tuple[str, str]]]:
    """fal's input schema -> a request, and the fields whose JSON type is wrong (left at their defaults in the
    request, so that the service's rules name only the fields that were given). `sync_mode` defaults to false, as
    on fal."""
    if not isinstance(body, dict):
        return GenerationRequest(prompt="-"), [("body", "must be a JSON object")]
    violations, kw = [], {"sync_mode": False}
    for name, types in FIELD_TYPES.items():
        value = body.get(name)
        if value is None:
            continue
        if int in types and float not in types:
            value = integral(value)
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            kind = "a number" if float in types else " or ".join(JSON_NAMES[t] for t in types)
            violations.append((name, f"must be {kind}"))
            continue
        kw[name] = (integral(value.get("width")), integral(value.get("height"))) if isinstance(value, dict) else value
    if "prompt" not in kw and not violations:
        violations.append(("prompt", "is required"))
    return GenerationRequest(**{"prompt": "-", **kw}), violations  # a placeholder prompt when missing or mistyped


JSON_NAMES = {str: "a string", dict: "a {width, height} object", int: "an integer", bool: "a boolean"}


class _Released(StreamingResponse):
    """A stream that gives back what it holds (a key's place among its open streams) however it ends."""

    def __init__(self, content: Any, release: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _request_route_methods(subpath: str) -> str | None:
    """The methods of the request route a submit's subpath names (`requests/<id>[/status|/cancel|...]`), None when
    it names none: those paths belong to the request routes, so a POST there is 405, not a submit."""
    head, _, rest = subpath.partition("/")
    if head != "requests":
        return None
    return "PUT" if rest.count("/") == 1 and rest.endswith("/cancel") else "GET"


def _app_id(request: Request) -> str:
    return f"{request.path_params['owner']}/{request.path_params['name']}"


def _with_logs(request: Request) -> bool:
    """fal's JavaScript client sends logs=1|0, its Python client logs=true|false."""
    return request.query_params.get("logs", "0").lower() in ("1", "true")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _unavailable(detail: str, status: int = 503) -> JSONResponse:
    """503 (429: a key's own limit) for work this server cannot take now, with how long to wait before retrying."""
    return JSONResponse({"detail": detail}, status, headers={"Retry-After": str(RETRY_AFTER_S)})


def _logs(lines: list[dict]) -> list[dict]:
    return [{"message": line["message"], "level": LEVELS.get(line.get("level", "INFO"), "INFO"), "source": "USER",
             "timestamp": _iso(line.get("timestamp", time.time()))} for line in lines]


class FalApi:
    def __init__(self, service: Requests, *, keys: ApiKeys, max_streams: int, app_ids: list[str] = (),
                 public_url: str | None = None):
        """`max_streams`: status streams open at once per key (per client address where no keys are configured;
        the setting --http-max-streams-per-key)."""
        self.service, self.keys, self.public_url, self.max_streams = service, keys, public_url, max_streams
        self.app_ids = {DEFAULT_APP_ID, *app_ids}
        self._streams: Counter[str] = Counter()

    # -- shared -----------------------------------------------------------------------------------------------
    def _base(self, request: Request) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"{request.url.scheme}://{request.url.netloc}"

    def _urls(self, request: Request, app_id: str, request_id: str) -> dict[str, str]:
        url = f"{self._base(request)}/queue/{app_id}/requests/{request_id}"
        return {"response_url": url, "status_url": f"{url}/status", "cancel_url": f"{url}/cancel"}

    def _refusal(self, request: Request) -> Response | None:
        """401 without a valid key (when keys are configured), 404 for an app this server does not serve, 503 while
        the server cannot take work."""
        if not self.keys.allows(request.headers.get("authorization", "")):
            return JSONResponse({"detail": "a valid API key is required (Authorization: Key <key>)"}, 401)
        if _app_id(request) not in self.app_ids:
            return JSONResponse({"detail": "no such app on this server"}, 404)
        if (why := self.service.unavailable()) is not None:
            return _unavailable(str(why))
        return None

    def _tenant(self, request: Request) -> str:
        return self.keys.tenant(request.headers.get("authorization", ""))

    def _viewer(self, request: Request) -> str | None:
        """Whose requests the call may see (server/api/keys.py): another tenant's id is answered 404."""
        return self.keys.viewer(request.headers.get("authorization", ""))

    @staticmethod
    def _answer(body: Any, status: int = 200, request_id: str = "") -> JSONResponse:
        headers = {"x-fal-request-id": request_id} if request_id else None
        return JSONResponse(body, status, headers=headers)

    @staticmethod
    def _invalid(violations: list[tuple[str, str]]) -> JSONResponse:
        return JSONResponse({"detail": _detail(violations)}, 422)

    def _refused(self, exc: Exception) -> JSONResponse:
        """A request the service refused: 422 naming every bad field, 429 past the key's own limit, 503 (with
        Retry-After) when the queue is full or the server cannot take work now."""
        if isinstance(exc, InvalidRequest):
            return self._invalid(exc.violations)
        if isinstance(exc, TenantLimit):
            return _unavailable(str(exc), 429)
        return _unavailable("the queue is full; retry later" if isinstance(exc, QueueFull) else str(exc))

    async def _input(self, request: Request, webhook_url: str = "") -> tuple[GenerationRequest | None,
                                                                               Response | None]:
        """The request a body asks for, or the answer that refuses it: 413 past the size limit, 422 naming every
        bad field (wrong JSON types, and the service's rules for the fields that were given)."""
        try:
            body = await read_json(request)
        except BodyRefused as refused:
            return None, (JSONResponse({"detail": str(refused)}, 413) if refused.status == 413
                          else self._invalid([("body", str(refused))]))
        except ClientGone:
            return None, Response(status_code=499)
        generation, mistyped = request_from_json(body)
        if mistyped:
            return None, self._invalid(mistyped + [v for v in self.service.violations(generation, webhook_url)
                                                   if v not in mistyped])
        return generation, None

    def result_json(self, result: pb.GenerateResult, sync: bool) -> dict:
        images = []
        for img in result.images:
            url = img.url
            if sync:
                url = f"data:{img.content_type};base64,{base64.b64encode(img.file_data).decode()}"
            images.append({"url": url, "width": img.width, "height": img.height, "content_type": img.content_type,
                           "file_name": img.file_name, "file_size": img.file_size})
        t = result.timings
        timings = {"inference": t.total - t.queue, **{f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields}}
        return {"images": images, "timings": timings, "seed": result.seed,
                "has_nsfw_concepts": list(result.has_nsfw_concepts), "prompt": result.prompt}

    def stored_result_json(self, row: Row) -> dict:
        """A COMPLETED row as fal's output: data: URIs for sync_mode, signed URLs otherwise (blocking)."""
        result = self.service.stored(row)
        return self.result_json(result, any(img.file_data for img in result.images))

    def status_json(self, request: Request, app_id: str, found: Lookup, with_logs: bool) -> tuple[dict, int]:
        state = found.state
        body: dict[str, Any] = {"request_id": found.request_id, **self._urls(request, app_id, found.request_id)}
        if state == IN_QUEUE:
            body.update(status="IN_QUEUE", queue_position=found.queue_position)
            return body, 202
        body["logs"] = _logs(found.logs) if with_logs else None
        if state == IN_PROGRESS:
            body["status"] = "IN_PROGRESS"
            if found.progress[1]:  # extensions fal's clients ignore: the step, and the image as it forms
                body["progress"] = {"step": found.progress[0], "total_steps": found.progress[1]}
            if found.preview is not None:
                picture = found.preview
                body["preview"] = {"step": picture.step, "total_steps": picture.total, "content_type": PREVIEW_TYPE,
                                   "url": f"data:{PREVIEW_TYPE};base64,{base64.b64encode(picture.data).decode()}"}
            return body, 202
        body["status"] = "COMPLETED"
        if state == COMPLETED and found.row is not None and found.row.result:
            timings = pb.GenerateResult.FromString(found.row.result).timings
            body["metrics"] = {"inference_time": timings.total - timings.queue}
        elif found.error is not None:
            body.update(error=found.error.message[:1000], error_type=records.grpc_code(found.error).name)
        elif state == CANCELED:
            body.update(error="the request was cancelled", error_type="CANCELLED")
        return body, 200

    def error_answer(self, found: Lookup) -> tuple[dict, int]:
        """What a result request answers for a request that did not complete."""
        if found.state in (IN_QUEUE, IN_PROGRESS):
            return {"detail": "Request is still in progress"}, 400
        if found.state == CANCELED:
            return {"detail": "Request was cancelled"}, 400
        if found.error is not None and records.violations_from_status(found.error):
            return {"detail": _detail(records.violations_from_status(found.error))}, 422
        message = found.error.message[:1000] if found.error is not None else "the request failed"
        return {"detail": message}, 500

    # -- routes -----------------------------------------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        if (allowed := _request_route_methods(request.path_params.get("subpath", ""))) is not None:
            return JSONResponse({"detail": "Method Not Allowed"}, 405, headers={"Allow": allowed})
        if (refused := self._refusal(request)) is not None:
            return refused
        app_id = _app_id(request)
        webhook = request.query_params.get("fal_webhook", "")
        generation, invalid = await self._input(request, webhook)
        if invalid is not None:
            return invalid
        try:
            rid, position = await self.service.submit(generation, webhook_url=webhook, origin="fal",
                                                      tenant=self._tenant(request))
        except (InvalidRequest, TenantLimit, QueueFull, Unavailable) as exc:
            return self._refused(exc)
        body = {"status": "IN_QUEUE", "request_id": rid, **self._urls(request, app_id, rid),
                "queue_position": position}
        if webhook:
            body["gateway_request_id"] = rid
        return self._answer(body, 200, rid)

    async def _found(self, request: Request) -> tuple[str, Lookup | None, Response | None]:
        if (refused := self._refusal(request)) is not None:
            return "", None, refused
        rid = request.path_params["request_id"]
        found = await self.service.lookup(rid, self._viewer(request)) if is_request_id(rid) else None
        if found is None:
            return rid, None, JSONResponse({"detail": "Request not found"}, 404)
        return rid, found, None

    async def status(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return answer
        body, code = self.status_json(request, _app_id(request), found, _with_logs(request))
        return self._answer(body, code, rid)

    async def status_stream(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return answer
        app_id = _app_id(request)
        with_logs = _with_logs(request)
        viewer = self._viewer(request)
        owner = self._tenant(request) or (request.client.host if request.client else "")
        if self._streams[owner] >= self.max_streams:  # each open stream costs a store read a second at most
            return _unavailable(f"at most {self.max_streams} open status streams per key; close one, or poll "
                                "the status", 429)
        self._streams[owner] += 1

        def release() -> None:
            self._streams[owner] -= 1
            if self._streams[owner] <= 0:
                del self._streams[owner]

        async def events():
            sent_logs, last, last_sent, shown = 0, None, time.monotonic(), None
            while True:
                try:
                    found = await self.service.lookup(rid, viewer)
                except StoreUnavailable:  # the store is away for a while: the stream waits it out, kept alive
                    if time.monotonic() - last_sent >= KEEPALIVE_S:
                        last_sent = time.monotonic()
                        yield ": keepalive\n\n"
                    await asyncio.sleep(1.0)
                    continue
                if found is None:
                    return
                body, _ = self.status_json(request, app_id, found, with_logs)
                if body.get("logs") is not None:  # only the lines not sent yet: the JS client appends them
                    body["logs"], sent_logs = body["logs"][sent_logs:], len(body["logs"])
                if "preview" in body:  # each preview once: a step's event does not repeat the last one
                    if body["preview"]["step"] == shown:
                        del body["preview"]
                    else:
                        shown = body["preview"]["step"]
                now = (body["status"], body.get("queue_position"), (body.get("progress") or {}).get("step"), shown)
                if now != last or body.get("logs"):
                    last, last_sent = now, time.monotonic()
                    yield f"data: {json.dumps(body)}\n\n"
                elif time.monotonic() - last_sent >= KEEPALIVE_S:
                    last_sent = time.monotonic()
                    yield ": keepalive\n\n"
                if body["status"] == "COMPLETED":
                    return
                await self.service.changed(rid)

        return _Released(events(), release, media_type="text/event-stream",
                         headers={"x-fal-request-id": rid, "Cache-Control": "no-cache"})

    async def result(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return answer
        if found.state != COMPLETED or found.row is None:
            body, code = self.error_answer(found)
            return self._answer(body, code, rid)
        return await asyncio.to_thread(lambda: self._answer(self.stored_result_json(found.row), 200, rid))

    async def cancel(self, request: Request) -> Response:
        rid, found, answer = await self._found(request)
        if answer is not None:
            return self._answer({"status": "NOT_FOUND"}, 404) if answer.status_code == 404 else answer
        outcome = await self.service.cancel(rid, self._viewer(request))
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
        try:
            call = await self.service.start(generation, method="run", tenant=self._tenant(request))
        except (InvalidRequest, TenantLimit, QueueFull, Unavailable) as exc:
            return self._refused(exc)
        try:
            outcome = await unless_gone(request, call.outcome())
        except asyncio.CancelledError:  # the server is stopping: free the place or the step
            call.cancel()
            raise
        except ClientGone:  # the caller went away: free its place in the queue, or stop it at the next step
            call.cancel()
            return Response(status_code=499)  # nobody reads it: nginx's code for a client that closed
        if not isinstance(outcome, GenerationResult):
            status = records.outcome_status(outcome)
            violations = records.violations_from_status(status)
            if violations:
                return self._answer({"detail": _detail(violations)}, 422, call.id)
            return self._answer({"detail": status.message[:1000]}, 500, call.id)
        result = self.service.result(call.item)
        # base64 and JSON of up to 8 images at 2048^2 (~130 MB with sync_mode): a thread's work, not the loop's
        return await asyncio.to_thread(
            lambda: self._answer(self.result_json(result, generation.sync_mode), 200, call.id))

    def webhook_payload(self, row: Row) -> dict:
        """fal's webhook body: {request_id, gateway_request_id, status: OK|ERROR, payload, error} (blocking)."""
        body: dict[str, Any] = {"request_id": row.id, "gateway_request_id": row.id}
        if row.state == COMPLETED and row.result:
            return {**body, "status": "OK", "payload": self.stored_result_json(row), "error": None}
        error = status_pb2.Status.FromString(row.error) if row.error else None
        payload, code = self.error_answer(Lookup(row.id, row.state, error=error))
        return {**body, "status": "ERROR", "payload": payload, "error": f"Invalid status code: {code}"}
