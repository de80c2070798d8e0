"""API-key authentication as a server interceptor: `authorization: Key <key>` in the call metadata.

Keys are compared with hmac.compare_digest against every configured key (no early exit), so timing says
nothing about how much of a key was right. Keys are never logged. The health service needs no key, so that
load balancers and orchestrators can probe without one.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

from .logs import RateLimitedLog

log = logging.getLogger("pixart.server.auth")
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def load_keys(keys: Iterable[str] = (), keys_file: str | None = None, env: str = "") -> list[str]:
    """Keys from flags, a file (one a line, # comments) and an env value (comma-separated), de-duplicated."""
    out: list[str] = [k.strip() for k in keys if k.strip()]
    if keys_file:
        for line in Path(keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    out += [k.strip() for k in env.split(",") if k.strip()]
    return list(dict.fromkeys(out))


def presented_key(authorization: str) -> str:
    """The key in an `authorization: Key <key>` value (gRPC metadata or an HTTP header), or ""."""
    if isinstance(authorization, str) and authorization.startswith("Key "):
        return authorization[4:].strip()
    return ""


def key_matches(presented: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: list[str], on_reject: Callable[[str], None] | None = None):
        self._keys = list(keys)
        self._on_reject = on_reject
        self._log = RateLimitedLog(log, "rejected calls without a valid API key")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not self._keys or method.startswith(EXEMPT_PREFIXES):
            return await continuation(details)
        presented = ""
        for name, value in details.invocation_metadata or ():
            if name == "authorization":
                presented = presented_key(value)
        if presented and key_matches(presented, self._keys):
            return await continuation(details)
        self._log(method=method[:100])
        if self._on_reject:
            self._on_reject(method)
        handler = await continuation(details)
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    message = "missing or invalid API key (metadata `authorization: Key <key>`)"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator, like the handler it stands for

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(unary)
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
