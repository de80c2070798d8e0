"""API-key authentication of gRPC calls, as a server interceptor: `authorization: Key <key>` in the call metadata.

The health service needs no key, so that load balancers and orchestrators can probe without one. A rejected call
is answered UNAUTHENTICATED by a handler of the same kind as the method's, and logged at most once per interval.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from server.api.keys import ApiKeys
from server.observability.logs import RateLimitedLog

log = logging.getLogger("pixart.server.auth")
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys, on_reject: Callable[[str], None] | None = None):
        self._keys = keys
        self._on_reject = on_reject
        self._log = RateLimitedLog(log, "rejected calls without a valid API key")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not self._keys.required or method.startswith(EXEMPT_PREFIXES):
            return await continuation(details)
        authorization = ""
        for name, value in details.invocation_metadata or ():
            if name == "authorization":
                authorization = value
        if self._keys.allows(authorization):
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
