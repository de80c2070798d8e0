"""The pixart.v1.PixArt servicer: protos in, calls of the request service, protos and google.rpc.Status out.

Every call that produces images (Generate, GenerateStream, Submit) goes through the same bounded queue, so
backpressure and batching apply to all of them; only Submit is written to the durable store first. Validation is
the service's; this adapter only translates its refusals into status codes: INVALID_ARGUMENT with BadRequest field
violations, UNAVAILABLE (loading, shutting down), RESOURCE_EXHAUSTED (queue full).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.rpc import status_pb2

from engine.preview import CONTENT_TYPE as PREVIEW_TYPE
from engine.request import GenerationRequest, GenerationResult, InvalidRequest
from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc
from server.api.keys import ApiKeys
from server.core import records
from server.core.service import Requests
from server.core.work import Done, Logged, Previewed, Queued, QueueFull, Stepped, TenantLimit, Unavailable
from server.observability.metrics import Metrics
from server.storage import COMPLETED, IN_PROGRESS, IN_QUEUE, StoreUnavailable, is_request_id

NOT_FOUND_MESSAGE = "no such request (unknown, or expired after --result-ttl)"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# the final status code of the call being served, for the requests metric (each call runs in its own task)
_call_code: contextvars.ContextVar[list[str]] = contextvars.ContextVar("_call_code")


async def abort_with(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    """Abort the call with a google.rpc.Status, details included, as grpcio-status clients read them."""
    code = records.grpc_code(status)
    holder = _call_code.get(None)
    if holder is not None:
        holder[0] = code.name
    trailing = ((_STATUS_DETAILS_KEY, status.SerializeToString()),) if status.details else ()
    await context.abort(code, status.message, trailing_metadata=trailing)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    await abort_with(context, records.error_status(code, message))


@contextlib.contextmanager
def _counted(metrics: Metrics, method: str) -> Iterator[None]:
    """Count one call in the requests metric by method and final status code (set by abort_with on the way)."""
    holder = ["OK"]
    _call_code.set(holder)
    try:
        yield
    except BaseException as exc:
        if holder[0] == "OK":
            holder[0] = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"
        raise
    finally:
        metrics.requests.labels(method, holder[0]).inc()


def _observed(fn: Callable) -> Callable:
    """Count the call (unary or server-streaming) in the requests metric; a store that cannot be reached ends it
    UNAVAILABLE (nothing was committed: the caller may retry), never UNKNOWN."""
    name = fn.__name__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: PixArtServicer, request: Any, context: Any) -> AsyncIterator:
            with _counted(self.metrics, name):
                try:
                    async for item in fn(self, request, context):
                        yield item
                except StoreUnavailable as exc:
                    await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))

        return stream_wrapper

    @functools.wraps(fn)
    async def wrapper(self: PixArtServicer, request: Any, context: Any) -> Any:
        with _counted(self.metrics, name):
            try:
                return await fn(self, request, context)
            except StoreUnavailable as exc:
                await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    return wrapper


class PixArtServicer(pb_grpc.PixArtServicer):
    def __init__(self, service: Requests, metrics: Metrics, keys: ApiKeys | None = None):
        """`keys`: who a call is from (its tenant); the interceptor has already refused calls without a key."""
        self.service, self.metrics, self.keys = service, metrics, keys or ApiKeys()

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata() or ())
        return self.keys.tenant(metadata.get("authorization", ""))

    def _viewer(self, context: grpc.aio.ServicerContext) -> str | None:
        """Whose requests the call may see: its tenant's (None: all, for an admin key or a server without keys)."""
        metadata = dict(context.invocation_metadata() or ())
        return self.keys.viewer(metadata.get("authorization", ""))

    # -- translation of refusals -----------------------------------------------------------------------------
    async def _refused(self, exc: Exception, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, InvalidRequest):
            await abort_with(context, records.bad_request_status(exc.violations))
        if isinstance(exc, QueueFull):
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the queue is full ({self.service.max_queue} waiting); retry later")
        if isinstance(exc, TenantLimit):
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    @staticmethod
    async def _request_id(request_id: str, context: grpc.aio.ServicerContext) -> str:
        """The id of a Status/Result/Cancel call, refused (never echoed) unless it has the format Submit issues."""
        if not is_request_id(request_id):
            await abort_with(context, records.bad_request_status(
                [("request_id", "must be a request id as Submit returns it (32 lowercase hexadecimal digits)")]))
        return request_id

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _start(self, request: GenerationRequest, context: grpc.aio.ServicerContext, method: str) -> Any:
        try:
            return await self.service.start(request, deadline=self._deadline(context), method=method,
                                            tenant=self._tenant(context))
        except (InvalidRequest, QueueFull, TenantLimit, Unavailable) as exc:
            await self._refused(exc, context)

    # -- unary and streaming ---------------------------------------------------------------------------------
    @_observed
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        call = await self._start(records.request_from_proto(request), context, "Generate")
        try:
            outcome = await call.outcome()
        except asyncio.CancelledError:  # the caller cancelled or its deadline passed: free the place or the step
            call.cancel()
            raise
        if not isinstance(outcome, GenerationResult):
            await abort_with(context, records.outcome_status(outcome))
        return self.service.result(call.item)

    @_observed
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        call = await self._start(records.request_from_proto(request), context, "GenerateStream")
        rid = call.id
        try:
            async for update in call.updates():
                if isinstance(update, Queued):
                    yield pb.GenerateEvent(request_id=rid, queued=pb.QueuePosition(position=update.position))
                elif isinstance(update, Stepped):
                    yield pb.GenerateEvent(request_id=rid, progress=pb.Progress(step=update.step,
                                                                                 total_steps=update.total))
                elif isinstance(update, Previewed):
                    yield pb.GenerateEvent(request_id=rid, preview=pb.Preview(
                        step=update.step, total_steps=update.total, content_type=PREVIEW_TYPE, data=update.data))
                elif isinstance(update, Logged):
                    yield pb.GenerateEvent(request_id=rid, log=pb.LogLine(**update.line))
                elif isinstance(update, Done):
                    outcome = update.outcome
        except asyncio.CancelledError:
            call.cancel()
            raise
        if isinstance(outcome, GenerationResult):
            yield pb.GenerateEvent(request_id=rid, result=self.service.result(call.item))
        else:
            status = records.outcome_status(outcome)
            yield pb.GenerateEvent(request_id=rid, error=status)
            # the call itself ends with the same status, so that a caller who only looks at the status sees it
            _call_code.get()[0] = records.grpc_code(status).name
            context.set_code(records.grpc_code(status))
            context.set_details(status.message)

    # -- the durable queue -----------------------------------------------------------------------------------
    @_observed
    async def Submit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        try:
            rid, position = await self.service.submit(
                records.request_from_proto(request.request), webhook_url=request.webhook_url,
                request_bytes=request.request.SerializeToString(), tenant=self._tenant(context))
        except (InvalidRequest, QueueFull, TenantLimit, Unavailable) as exc:
            await self._refused(exc, context)
        return pb.SubmitResponse(request_id=rid, queue_position=position)

    @_observed
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        found = await self.service.lookup(await self._request_id(request.request_id, context), self._viewer(context))
        if found is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, NOT_FOUND_MESSAGE)
        out = pb.StatusResponse(request_id=found.request_id, state=pb.RequestState.Value(found.state))
        if found.state == IN_QUEUE:
            out.queue_position = found.queue_position
        elif found.state == IN_PROGRESS:
            out.progress.step, out.progress.total_steps = found.progress
        if found.error is not None:
            out.error.CopyFrom(found.error)
        if request.logs:
            out.logs.extend(pb.LogLine(**line) for line in found.logs)
        return out

    @_observed
    async def Result(self, request: pb.RequestRef, context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        found = await self.service.lookup(await self._request_id(request.request_id, context), self._viewer(context))
        if found is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, NOT_FOUND_MESSAGE)
        if found.state != COMPLETED or found.row is None:
            detail = f": {found.error.message[:500]}" if found.error is not None else ""
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                        f"the request is {found.state}, not COMPLETED{detail}")
        return await asyncio.to_thread(self.service.stored, found.row)

    @_observed
    async def Cancel(self, request: pb.RequestRef, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        rid = await self._request_id(request.request_id, context)
        outcome = await self.service.cancel(rid, self._viewer(context))
        if outcome == "queued":
            return pb.CancelResponse(request_id=rid, outcome=pb.CANCELLED_WHILE_QUEUED, state=pb.CANCELED)
        if outcome == "running":
            return pb.CancelResponse(request_id=rid, outcome=pb.CANCELLATION_REQUESTED, state=pb.IN_PROGRESS)
        if outcome == "unknown":
            return pb.CancelResponse(request_id=rid, outcome=pb.NOT_FOUND)
        found = await self.service.lookup(rid, self._viewer(context))
        state = pb.RequestState.Value(found.state) if found is not None else pb.REQUEST_STATE_UNSPECIFIED
        return pb.CancelResponse(request_id=rid, outcome=pb.ALREADY_COMPLETED, state=state)
