"""The HTTP port beside gRPC (Starlette on uvicorn, on the gRPC server's event loop): stored result images, /metrics,
/healthz, and the routes of HTTP transports (fal's queue protocol, server/api/http/fal.py).

Result images are served only through URLs the server signed (server/core/links.py), like an object store's
presigned URL, so a URL can be handed to a browser and stops working when it expires. With API keys configured,
`Authorization: Key <key>` also opens any result, without a signature. Before any file is touched the id must have
the issued format, the file name the engine's format, the request must be COMPLETED with `sync_mode=false`, and its
result must name that file; nothing else in the store folder (the database, keys) has a route.

With results in object storage the same checks run, then the answer is a 307 to a fresh presigned URL of the object
rather than the bytes: the server never carries image bytes it does not have to (clients normally get the presigned
URL directly; this route answers URLs and API-key fetches that name the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import mimetypes
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from engine.vocabulary import FORMAT_DETAILS
from server.api.http import schema
from server.api.http.guard import ConnectionGuard
from server.api.keys import ApiKeys
from server.api.limits import RETRY_AFTER_S
from server.core.links import ResultSigner
from server.storage import StoreUnavailable, is_request_id, is_result_file_name

log = logging.getLogger("pixart.server.http")

try:
    VERSION = importlib.metadata.version("pixart-sigma-serve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+source"


def build_app(
    *,
    keys: ApiKeys,
    healthy: Callable[[], bool],
    render_metrics: Callable[[], bytes] | None = None,
    signer: ResultSigner | None = None,
    result_file: Callable[[str, str, str | None], Awaitable[Path | str | None]] | None = None,
    cors_origins: list[str] = (),
) -> FastAPI:
    """The routes this port serves: /healthz; /metrics (when `render_metrics`); results (when `signer`: `result_file`
    gives a file to send, a URL to redirect to, or None, for a request of the given tenant, or with None anyone's);
    /openapi.json, which describes them all. HTTP transports add their own routes to it."""

    async def result(request: Request) -> Response:
        request_id, file_name = request.path_params["request_id"], request.path_params["file_name"]
        if not (is_request_id(request_id) and is_result_file_name(file_name)):
            return PlainTextResponse("not found\n", 404)
        query = request.query_params
        if not _well_formed(query):  # a signature given must be one the server could have made, key or not
            return PlainTextResponse("a malformed signature\n", 403)
        signed = signer.valid(request_id, file_name, query.get("expires", ""), query.get("signature", ""))
        authorization = request.headers.get("authorization", "")
        if not (signed or keys.proves(authorization)):
            return PlainTextResponse("a valid signature (or, where keys are configured, an API key) is required\n",
                                     403 if "signature" in query or not keys.required else 401)
        # a signed URL opens its one file for whoever holds it; a key opens its own tenant's requests only
        path = await result_file(request_id, file_name, None if signed else keys.viewer(authorization))
        if path is None:
            return PlainTextResponse("not found\n", 404)
        if isinstance(path, str):  # a presigned URL carries its own expiry: nothing here may cache the redirect
            return RedirectResponse(path, 307, headers={"Cache-Control": "no-store"})
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "private, max-age=300"})

    async def metrics(request: Request) -> Response:
        if not keys.allows(request.headers.get("authorization", "")):
            return PlainTextResponse("an API key is required (Authorization: Key <key>)\n", 401)
        body = await asyncio.to_thread(render_metrics)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n") if healthy() else PlainTextResponse("not serving\n", 503)

    errors = InternalErrors()
    app = FastAPI(title="PixArt-Σ serving", version=VERSION, openapi_url="/openapi.json", docs_url=None,
                  redoc_url=None, exception_handlers={Exception: errors.answer, StoreUnavailable: store_unavailable,
                                                      RequestValidationError: invalid_parameters})
    if cors_origins:  # pages on those origins may call the API from a browser (the key still applies)
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "PUT"],
                           allow_headers=["Authorization", "Content-Type", "x-fal-target-url"],
                           expose_headers=["x-fal-request-id", "Retry-After"], max_age=600)
    app.state.errors = errors
    app.state.body_schemas = {}  # the request bodies routes read themselves, added by each transport's mount
    app.openapi = lambda: _document(app)
    app.add_api_route("/healthz", healthz, methods=["GET"], operation_id="health",
                      summary="Whether this replica serves",
                      responses={200: schema.text("serving"), 503: schema.text("starting, draining or store away")})
    if signer is not None and result_file is not None:
        formats = {kind: {"schema": {"type": "string", "format": "binary"}} for kind, *_ in FORMAT_DETAILS.values()}
        app.add_api_route(
            "/results/{request_id}/{file_name}", result, methods=["GET"], operation_id="result_file",
            summary="A stored result image",
            responses={200: {"description": "the image", "content": formats},
                       307: {"description": "a fresh presigned URL of the object (results in object storage)"},
                       401: schema.text("an API key or a signature is required"),
                       403: schema.text("the signature is invalid or expired"),
                       404: schema.text("no such result"), 503: schema.UNAVAILABLE},
            openapi_extra={"security": [{}, {"apiKey": []}], "parameters": [
                schema.parameter("request_id", "path", schema.REQUEST_ID),
                schema.parameter("file_name", "path", schema.RESULT_FILE_NAME),
                schema.parameter("expires", "query", {"type": "string", "pattern": "^[0-9]{1,12}$"},
                                 description="unix seconds, from the signed URL"),
                schema.parameter("signature", "query", {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                 description="HMAC-SHA256, from the signed URL")]})
    if render_metrics is not None:
        app.add_api_route("/metrics", metrics, methods=["GET"], operation_id="metrics", summary="Prometheus metrics",
                          responses={200: schema.text("Prometheus text format"),
                                     401: schema.text("a valid API key is required")},
                          openapi_extra={"security": [{"apiKey": []}]})
    return app


def _well_formed(query: Any) -> bool:
    """Absent, or as ResultSigner writes them: expires 1-12 ASCII digits, signature 64 lowercase hex digits."""
    expires, signature = query.get("expires"), query.get("signature")
    return ((expires is None or re.fullmatch(r"[0-9]{1,12}", expires) is not None)
            and (signature is None or re.fullmatch(r"[0-9a-f]{64}", signature) is not None))


def _document(app: FastAPI) -> dict:
    """FastAPI's document of the routes, with the request bodies the routes read themselves and the key scheme."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               description="PixArt-Σ text-to-image: fal's queue protocol, results and health.")
        components = document.setdefault("components", {})
        components.setdefault("schemas", {}).update(app.state.body_schemas)
        components["securitySchemes"] = schema.SECURITY
        app.openapi_schema = document
    return app.openapi_schema


ANSWERED = "pixart.error_answered"  # set in a request's scope once InternalErrors has answered its exception


class InternalErrors:
    """What the port answers and logs when a route raises: 500 with a stable message and a correlation id (fal's
    JSON shape), the traceback logged under that id, at most `per_minute` tracebacks a minute (then one line a
    minute with how many more), so that input able to make a route raise cannot flood the log."""

    def __init__(self, per_minute: int = 10):
        self.per_minute, self.window, self.logged, self.dropped = per_minute, 0.0, 0, 0

    async def answer(self, request: Request, exc: Exception) -> Response:
        correlation = secrets.token_hex(8)
        request.scope[ANSWERED] = True
        self.log(exc, correlation, request.url.path[:200])
        return JSONResponse({"detail": f"internal error; correlation id {correlation}"}, 500)

    def log(self, exc: BaseException, correlation: str, path: str) -> None:
        now = time.monotonic()
        if now - self.window >= 60.0:
            if self.dropped:
                log.error("internal errors not logged in the last minute", extra={"count": self.dropped})
            self.window, self.logged, self.dropped = now, 0, 0
        if self.logged >= self.per_minute:
            self.dropped += 1
            return
        self.logged += 1
        log.error("internal error", extra={"correlation_id": correlation, "path": path}, exc_info=exc)


class _Contained:
    """The app as uvicorn runs it: Starlette answers a route's exception through InternalErrors and then raises it
    again for the server to log, which uvicorn would do with a full traceback each time. It has been answered and
    logged (rate-limited) already, so it stops here; one raised after the response started is logged the same way."""

    def __init__(self, app: FastAPI, errors: InternalErrors):
        self.app, self.errors = app, errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - answered (500) and logged by InternalErrors, or logged here
            if not scope.get(ANSWERED):
                self.errors.log(exc, secrets.token_hex(8), str(scope.get("path", ""))[:200])


async def store_unavailable(request: Request, exc: Exception) -> Response:
    """Any route whose store call found the database away: 503 with Retry-After, nothing committed."""
    return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def invalid_parameters(request: Request, exc: Exception) -> Response:
    """FastAPI's own parameter checks, in fal's 422 shape and without echoing what was sent (the routes declare
    their parameters as plain strings and check them themselves, so this answers only what slips past that)."""
    errors = getattr(exc, "errors", list)()
    detail = [{"loc": [str(p)[:64] for p in e.get("loc", ())], "msg": str(e.get("msg", ""))[:200],
               "type": str(e.get("type", "value_error"))[:64]} for e in errors[:20]]
    return JSONResponse({"detail": detail}, 422)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gRPC server's loop owns SIGTERM/SIGINT and drains both servers
        yield


class HttpServer:
    """uvicorn serving `app` on the running event loop, on a socket bound here (so port 0 works)."""

    def __init__(self, app: FastAPI, host: str, port: int, *, guard: ConnectionGuard, tls_cert: str | None = None,
                 tls_key: str | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        # Accepted connections inherit this: without it, a response written in two parts (headers, then body) waits
        # for the client's delayed ACK, ~40 ms on every keep-alive request (measured: 44 ms -> 0.3 ms per call)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = bool(tls_cert and tls_key)
        self.app, self.guard = app, guard
        config = uvicorn.Config(_Contained(app, app.state.errors), http=guard.protocol(), lifespan="off",
                                log_config=None, access_log=False, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                timeout_graceful_shutdown=2, server_header=False)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self.socket.close()
