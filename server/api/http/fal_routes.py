"""fal's routes on the HTTP port, each declared with its parameters and answers so that /openapi.json documents
them (server/api/http/schema.py), and fal's proxy mode, which answers a call through the route a header names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from server.api.http import schema
from server.api.http.fal import FalApi
from server.api.keys import ApiKeys
from server.webhooks import MAX_URL_CHARS, URL_PATTERN

QUEUE_HOST, RUN_HOST = "queue.fal.run", "fal.run"
PROXY_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def mount(api: FalApi, app: FastAPI) -> None:
    """Add fal's routes, documented, to the HTTP port's app, and its proxy mode (routed through the app)."""
    app.state.body_schemas.update(schema.body_schemas(schema.FalInput))
    owners, names = zip(*(app_id.split("/", 1) for app_id in sorted(api.app_ids)), strict=True)
    served = [schema.parameter("owner", "path", {"type": "string", "enum": sorted(set(owners))}),
              schema.parameter("name", "path", {"type": "string", "enum": sorted(set(names))})]
    one = [*served, schema.parameter("request_id", "path", schema.REQUEST_ID)]
    logs = schema.parameter("logs", "query", {"type": "string"}, description="1 or true: include log lines")
    webhook = schema.parameter("fal_webhook", "query", {"type": "string", "maxLength": MAX_URL_CHARS,
                                                         "pattern": f"^$|{URL_PATTERN}"},
                               description="a URL told the outcome; the server's destination policy applies "
                                           "(public addresses unless the operator opened others)")
    subpath = schema.parameter("subpath", "path", {"type": "string"},
                               description="ignored: fal's clients may name an endpoint of the app")
    security = {"security": [{"apiKey": []}]} if api.keys.required else {}
    refused = schema.REFUSED
    given = {413: schema.json_of(schema.Detail, "the body is larger than 1 MB"), 422: schema.INVALID,
             429: schema.LIMITED}

    def add(path: str, endpoint: Callable, method: str, operation: str, summary: str, parameters: list[dict],
            responses: dict, status_code: int = 200, reads_body: bool = False) -> None:
        extra = {**security, "parameters": parameters}
        if reads_body:
            extra["requestBody"] = schema.body(schema.FalInput)
        app.add_api_route(path, endpoint, methods=[method], operation_id=operation, summary=summary,
                          status_code=status_code, responses=responses, openapi_extra=extra)

    queue, run, requests = "/queue/{owner}/{name}", "/run/{owner}/{name}", "/queue/{owner}/{name}/requests"
    done = schema.json_of(schema.QueueStatus, "done (an error is COMPLETED with error and error_type)")
    running = schema.json_of(schema.QueueStatus, "queued or running")
    stream = {"description": "server-sent events: each status as it changes (data: QueueStatus JSON), new log "
                             "lines only, ending after COMPLETED",
              "content": {"text/event-stream": {"itemSchema": schema.event_of(schema.QueueStatus)}}}
    not_done = schema.json_of(schema.Detail, "still running, or cancelled")
    failed = schema.json_of(schema.Detail, "the request failed")
    output = schema.json_of(schema.FalOutput, "the images")
    add(f"{requests}/{{request_id}}/status/stream", api.status_stream, "GET", "fal_status_stream",
        "Follow a request's status", [*one, logs], {200: stream, **refused})
    add(f"{requests}/{{request_id}}/status", api.status, "GET", "fal_status", "A request's status", [*one, logs],
        {200: done, 202: running, **refused})
    cancel_answer = schema.json_of(schema.CancelAnswer, "")
    add(f"{requests}/{{request_id}}/cancel", api.cancel, "PUT", "fal_cancel", "Cancel a request", one,
        {202: {**cancel_answer, "description": "it stops at its next step"},
         400: {**cancel_answer, "description": "it had already ended"},
         **refused, 404: {"model": schema.CancelAnswer | schema.Detail, "description": "no such request or app"}},
        status_code=202)
    add(f"{requests}/{{request_id}}", api.result, "GET", "fal_result", "A request's result", one,
        {200: output, 400: not_done, 422: schema.json_of(schema.FieldErrors, "the input was refused"),
         500: failed, **refused})
    # the submitted request's own routes, for clients (and the fuzzer's stateful phase) to follow
    same = {"owner": "$request.path.owner", "name": "$request.path.name",
            "request_id": "$response.body#/request_id"}
    links = {op: {"operationId": op, "parameters": same}
             for op in ("fal_status", "fal_status_stream", "fal_result", "fal_cancel")}
    submitted = {**schema.json_of(schema.QueueSubmitted, "queued"), "links": links}
    for path, extra, op in ((queue, [], "fal_submit"), (f"{queue}/{{subpath:path}}", [subpath], "fal_submit_to")):
        add(path, api.submit, "POST", op, "Submit a request to the queue", [*served, *extra, webhook],
            {200: submitted, **given, **refused}, reads_body=True)
    for path, extra, op in ((run, [], "fal_run"), (f"{run}/{{subpath:path}}", [subpath], "fal_run_at")):
        add(path, api.run, "POST", op, "Generate, answering on the same connection", [*served, *extra],
            {200: output, **given, 500: failed, **refused}, reads_body=True)
    target = schema.parameter("x-fal-target-url", "header", {"type": "string", "maxLength": 8192,
                                                             "pattern": r"^https://(queue\.)?fal\.run(/.*)?$"},
                              required=True,
                              description="https://queue.fal.run/... or https://fal.run/...: the route to answer")
    proxy = _Proxy(app.router, api.keys)
    for method in PROXY_METHODS:  # a route per method: each is its own operation in the document
        app.add_api_route("/fal/proxy", proxy.forward, methods=[method], operation_id=f"fal_proxy_{method.lower()}",
                          summary="fal's proxy mode: one URL, the route named by a header",
                          responses={400: schema.json_of(schema.Detail, "no acceptable x-fal-target-url"),
                                     "default": {"description": "what the named route answers"}},
                          openapi_extra={**security, "parameters": [target]})


class _Proxy:
    """fal's proxy mode (`proxyUrl` in the JS client): every call arrives at one URL and names its real target in
    `x-fal-target-url`; only fal's queue and run hosts are accepted, and the call is answered here, never forwarded."""

    def __init__(self, router: Callable[[Scope, Receive, Send], Awaitable[None]], keys: ApiKeys):
        self.router, self.keys = router, keys

    async def forward(self, request: Request) -> Response:
        if not self.keys.allows(request.headers.get("authorization", "")):  # the key first, as every route does
            return JSONResponse({"detail": "a valid API key is required (Authorization: Key <key>)"}, 401)
        target = request.headers.get("x-fal-target-url", "")
        parts = urlsplit(target) if len(target) <= 8192 else None
        prefix = {QUEUE_HOST: "/queue", RUN_HOST: "/run"}.get(parts.hostname if parts else None)
        if parts is None or parts.scheme != "https" or prefix is None:
            return JSONResponse({"detail": "x-fal-target-url must be an https://queue.fal.run/... or "
                                           "https://fal.run/... URL"}, 400)
        path = prefix + (parts.path or "/")
        inner = dict(request.scope, path=path, raw_path=path.encode(), query_string=parts.query.encode())
        return _Routed(self.router, inner)


class _Routed(Response):
    """The answer of another route of this app: the router runs it on the same connection."""

    def __init__(self, router: Callable[[Scope, Receive, Send], Awaitable[None]], scope: Scope):
        super().__init__()
        self.router, self.scope = router, scope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(self.scope, receive, send)
