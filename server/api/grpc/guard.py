"""Bytes that do not decode never reach a handler: the call ends INVALID_ARGUMENT with a short message.

grpc.aio runs a method's request deserializer before the handler; when protobuf raises (invalid UTF-8 in a string,
a truncated varint, a corrupt wire format), grpc answers UNKNOWN with the exception text and logs a traceback per
call. This interceptor gives every handler a deserializer that cannot raise, marks undecodable messages, and
refuses them before the handler runs, with at most one log line per interval however many arrive.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import grpc

from server.observability.logs import RateLimitedLog

log = logging.getLogger("pixart.server.guard")
MESSAGE = "the request is not a valid protobuf message of this method's type"
LOG_INTERVAL_S = 10.0


class _Undecodable:
    __slots__ = ()


UNDECODABLE = _Undecodable()


class DecodeGuard(grpc.aio.ServerInterceptor):
    def __init__(self, on_refuse: Callable[[str], None] | None = None, log_interval_s: float = LOG_INTERVAL_S):
        self._log = RateLimitedLog(log, "refused undecodable requests", log_interval_s)
        self._on_refuse = on_refuse

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._guarded(handler, details.method)

    async def _refuse(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self._log(method=method[:100])
        if self._on_refuse is not None:
            self._on_refuse(method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer

        def safe_deserialize(data: bytes) -> object:
            try:
                return deserialize(data)
            except Exception:
                return UNDECODABLE

        async def checked(requests, context):
            async for request in requests:
                if request is UNDECODABLE:
                    await self._refuse(method, context)
                yield request

        kw = {"request_deserializer": safe_deserialize, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                if request is UNDECODABLE:
                    await self._refuse(method, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.stream_unary:
            inner = handler.stream_unary

            async def stream_unary(requests, context):
                return await inner(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        if handler.unary_stream:
            inner = handler.unary_stream
            if inspect.isasyncgenfunction(inner):

                async def unary_stream(request, context):
                    if request is UNDECODABLE:
                        await self._refuse(method, context)
                    async for response in inner(request, context):
                        yield response
            else:  # a handler that writes with context.write (the health service's Watch)

                async def unary_stream(request, context):
                    if request is UNDECODABLE:
                        await self._refuse(method, context)
                    return await inner(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        inner = handler.stream_stream
        if inspect.isasyncgenfunction(inner):

            async def stream_stream(requests, context):
                async for response in inner(checked(requests, context), context):
                    yield response
        else:

            async def stream_stream(requests, context):
                return await inner(checked(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
