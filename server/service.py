"""The gRPC servicer: validate in one place, hand work to the scheduler, stream what happens, answer queue calls.

Every call that produces images (Generate, GenerateStream, Submit) goes through the same bounded queue, so
backpressure and batching apply to all of them; only Submit is written to the durable store first.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import status_pb2

from engine.request import GenerationRequest, GenerationResult
from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc

from . import convert
from . import store as st
from .batcher import Draining, QueueFull, WorkItem

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pixart.server.service")
SHUTTING_DOWN = "the server is shutting down; retry elsewhere"
NOT_FOUND_MESSAGE = "no such request (unknown, or expired after --result-ttl)"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# the final status code of the call being served, for the requests metric (each call runs in its own task)
_call_code: contextvars.ContextVar[list[str]] = contextvars.ContextVar("_call_code")


async def abort_with(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    """Abort the call with a google.rpc.Status, details included, as grpcio-status clients read them."""
    code = convert.grpc_code(status)
    holder = _call_code.get(None)
    if holder is not None:
        holder[0] = code.name
    trailing = ((_STATUS_DETAILS_KEY, status.SerializeToString()),) if status.details else ()
    await context.abort(code, status.message, trailing_metadata=trailing)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    await abort_with(context, convert.error_status(code, message))


def _observed(fn: Callable) -> Callable:
    """Count the call in the requests metric by method and final status code."""
    name = fn.__name__

    def finish(self: PixArtService, holder: list[str], exc: BaseException | None) -> None:
        code = holder[0]
        if exc is not None and code == "OK":
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"
        self.app.metrics.requests.labels(name, code).inc()

    if name == "GenerateStream":

        @functools.wraps(fn)
        async def stream_wrapper(self: PixArtService, request: Any, context: Any) -> AsyncIterator:
            holder = ["OK"]
            _call_code.set(holder)
            exc: BaseException | None = None
            try:
                async for item in fn(self, request, context):
                    yield item
            except BaseException as e:
                exc = e
                raise
            finally:
                finish(self, holder, exc)

        return stream_wrapper

    @functools.wraps(fn)
    async def wrapper(self: PixArtService, request: Any, context: Any) -> Any:
        holder = ["OK"]
        _call_code.set(holder)
        exc: BaseException | None = None
        try:
            return await fn(self, request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            finish(self, holder, exc)

    return wrapper


class PixArtService(pb_grpc.PixArtServicer):
    def __init__(self, app: App):
        self.app = app

    # -- shared steps ---------------------------------------------------------------------------------------
    async def _accept(
        self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext, webhook_url: str = ""
    ) -> GenerationRequest:
        """Refuse a call the server cannot take now, or a request with any bad field (all of them named).

        Only cheap checks run here: cleaning and tokenizing the prompts (up to 20,000 characters) happen in the
        engine's `prepare`, on the worker thread, so the event loop (health included) never waits on text.
        """
        if self.app.draining:
            await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if self.app.engine is None:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the engine is still loading; retry shortly")
        request = convert.request_from_proto(msg)
        violations = self.app.webhook_policy.violations(webhook_url) + self.app.engine.violations(request)
        if violations:
            log.info("refused", extra={"violations": [f"{f}: {rule}" for f, rule in violations]})
            await abort_with(context, convert.bad_request_status(violations))
        return request

    @staticmethod
    async def _request_id(request_id: str, context: grpc.aio.ServicerContext) -> str:
        """The id of a Status/Result/Cancel call, refused (never echoed) unless it has the format Submit issues."""
        if not st.is_request_id(request_id):
            await abort_with(context, convert.bad_request_status(
                [("request_id", "must be a request id as Submit returns it (32 lowercase hexadecimal digits)")]))
        return request_id

    async def _enqueue(self, job: WorkItem, context: grpc.aio.ServicerContext) -> int:
        """Queue the job and return its position, or end the call: queue full, or shutting down."""
        try:
            return self.app.batcher.submit(job)
        except (QueueFull, Draining) as exc:
            await self._queue_refused(exc, context)
        raise AssertionError("unreachable")

    async def _queue_refused(self, exc: QueueFull | Draining, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, QueueFull):
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the queue is full ({self.app.config.max_queue} waiting); retry later")
        await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    @staticmethod
    def _listen(job: WorkItem) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(_job: WorkItem, event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job.listeners.append(listener)
        return events

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _result(self, job: WorkItem) -> pb.GenerateResult:
        assert isinstance(job.outcome, GenerationResult)
        sync = job.request.sync_mode
        urls = None if sync else [self.app.result_url(job.id, img.file_name) for img in job.outcome.images]
        return convert.result_to_proto(job.outcome, job.id, queue_s=job.queue_s, urls=urls, include_data=sync)

    # -- unary and streaming --------------------------------------------------------------------------------
    @_observed
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        req = await self._accept(request, context)
        job = WorkItem(req, deadline=self._deadline(context))
        events = self._listen(job)
        await self._enqueue(job, context)
        log.info("accepted", extra={"request_id": job.id, "method": "Generate"})
        try:
            while (await events.get())[0] != "done":
                pass
        except asyncio.CancelledError:  # the caller cancelled or its deadline passed: free the place or the step
            self.app.batcher.cancel(job.id)
            raise
        if not isinstance(job.outcome, GenerationResult):
            await abort_with(context, convert.outcome_status(job.outcome))
        return self._result(job)

    @_observed
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        req = await self._accept(request, context)
        job = WorkItem(req, deadline=self._deadline(context))
        events = self._listen(job)
        position = await self._enqueue(job, context)
        log.info("accepted", extra={"request_id": job.id, "method": "GenerateStream"})
        try:
            yield pb.GenerateEvent(request_id=job.id, queued=pb.QueuePosition(position=position))
            while True:
                event = await events.get()
                kind = event[0]
                if kind == "queued":
                    yield pb.GenerateEvent(request_id=job.id, queued=pb.QueuePosition(position=event[1]))
                elif kind == "progress":
                    yield pb.GenerateEvent(request_id=job.id, progress=pb.Progress(step=event[1], total_steps=event[2]))
                elif kind == "log":
                    yield pb.GenerateEvent(request_id=job.id, log=pb.LogLine(**event[1]))
                elif kind == "done":
                    break
        except asyncio.CancelledError:
            self.app.batcher.cancel(job.id)
            raise
        if isinstance(job.outcome, GenerationResult):
            yield pb.GenerateEvent(request_id=job.id, result=self._result(job))
        else:
            status = convert.outcome_status(job.outcome)
            yield pb.GenerateEvent(request_id=job.id, error=status)
            # the call itself ends with the same status, so that a caller who only looks at the status sees it
            _call_code.get()[0] = convert.grpc_code(status).name
            context.set_code(convert.grpc_code(status))
            context.set_details(status.message)

    # -- the durable queue ----------------------------------------------------------------------------------
    @_observed
    async def Submit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        req = await self._accept(request.request, context, request.webhook_url)
        try:
            rid, position = await self.app.submit(req, request.webhook_url,
                                                  request_bytes=request.request.SerializeToString())
        except (QueueFull, Draining) as exc:
            await self._queue_refused(exc, context)
        return pb.SubmitResponse(request_id=rid, queue_position=position)

    @_observed
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        found = await self.app.lookup(await self._request_id(request.request_id, context))
        if found is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, NOT_FOUND_MESSAGE)
        out = pb.StatusResponse(request_id=found.request_id, state=pb.RequestState.Value(found.state))
        if found.state == st.IN_QUEUE:
            out.queue_position = found.queue_position
        elif found.state == st.IN_PROGRESS:
            out.progress.step, out.progress.total_steps = found.progress
        if found.error is not None:
            out.error.CopyFrom(found.error)
        if request.logs:
            out.logs.extend(pb.LogLine(**line) for line in found.logs)
        return out

    @_observed
    async def Result(self, request: pb.RequestRef, context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        found = await self.app.lookup(await self._request_id(request.request_id, context))
        if found is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, NOT_FOUND_MESSAGE)
        if found.state != st.COMPLETED or found.row is None:
            detail = f": {found.error.message[:500]}" if found.error is not None else ""
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                        f"the request is {found.state}, not COMPLETED{detail}")
        return await asyncio.to_thread(self.app.stored_result, found.row)

    @_observed
    async def Cancel(self, request: pb.RequestRef, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        rid = await self._request_id(request.request_id, context)
        outcome = await self.app.cancel(rid)
        if outcome == "queued":
            return pb.CancelResponse(request_id=rid, outcome=pb.CANCELLED_WHILE_QUEUED, state=pb.CANCELED)
        if outcome == "running":
            return pb.CancelResponse(request_id=rid, outcome=pb.CANCELLATION_REQUESTED, state=pb.IN_PROGRESS)
        if outcome == "unknown":
            return pb.CancelResponse(request_id=rid, outcome=pb.NOT_FOUND)
        found = await self.app.lookup(rid)
        state = pb.RequestState.Value(found.state) if found is not None else pb.REQUEST_STATE_UNSPECIFIED
        return pb.CancelResponse(request_id=rid, outcome=pb.ALREADY_COMPLETED, state=state)
