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
import mimetypes
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from server.api.keys import ApiKeys
from server.api.limits import RETRY_AFTER_S
from server.core.links import ResultSigner
from server.storage import StoreUnavailable, is_request_id, is_result_file_name


def build_app(
    *,
    keys: ApiKeys,
    healthy: Callable[[], bool],
    render_metrics: Callable[[], bytes] | None = None,
    signer: ResultSigner | None = None,
    result_file: Callable[[str, str], Awaitable[Path | str | None]] | None = None,
) -> Starlette:
    """The routes this port serves: /healthz; /metrics (when `render_metrics`); results (when `signer`: `result_file`
    gives a file to send, a URL to redirect to, or None). HTTP transports mount their own routes on it."""

    async def result(request: Request) -> Response:
        request_id, file_name = request.path_params["request_id"], request.path_params["file_name"]
        if not (is_request_id(request_id) and is_result_file_name(file_name)):
            return PlainTextResponse("not found\n", 404)
        query = request.query_params
        signed = signer.valid(request_id, file_name, query.get("expires", ""), query.get("signature", ""))
        if not (signed or keys.proves(request.headers.get("authorization", ""))):
            return PlainTextResponse("a valid signature (or, where keys are configured, an API key) is required\n",
                                     403 if "signature" in query or not keys.required else 401)
        path = await result_file(request_id, file_name)
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

    table: list[BaseRoute] = [Route("/healthz", healthz)]
    if signer is not None and result_file is not None:
        table.append(Route("/results/{request_id}/{file_name}", result))
    if render_metrics is not None:
        table.append(Route("/metrics", metrics))
    return Starlette(routes=table, exception_handlers={StoreUnavailable: store_unavailable})


async def store_unavailable(request: Request, exc: Exception) -> Response:
    """Any route whose store call found the database away: 503 with Retry-After, nothing committed."""
    return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gRPC server's loop owns SIGTERM/SIGINT and drains both servers
        yield


class HttpServer:
    """uvicorn serving `app` on the running event loop, on a socket bound here (so port 0 works)."""

    def __init__(self, app: Starlette, host: str, port: int, *, tls_cert: str | None = None,
                 tls_key: str | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.tls = bool(tls_cert and tls_key)
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, ssl_certfile=tls_cert,
                                ssl_keyfile=tls_key, timeout_graceful_shutdown=2, server_header=False)
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
