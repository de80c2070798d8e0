"""The asyncio client: the core's calls and plans, carried out by awaiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from protos.pixart.v1 import pixart_pb2 as pb

from .core import Call, ClientCore, PixArtError, Plan, Sleep, StreamWatch


class AsyncClient(ClientCore):
    """asyncio client; the same calls as Client, awaited (stream is an async iterator)."""

    _channels = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _run(self, call: Call) -> Any:
        try:
            reply = await self._start(call)
        except grpc.RpcError as err:
            raise PixArtError.from_rpc(err) from None
        return call.unwrap(reply)

    async def _carry_out(self, plan: Plan) -> Any:
        answer = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as done:
                return done.value
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                answer = None
            else:
                answer = await self._run(step)

    async def generate(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.GenerateResult:
        return await self._run(self._generate_call(prompt, timeout, fields))

    async def stream(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> AsyncIterator[pb.GenerateEvent]:
        call = self._start(self._stream_call(prompt, timeout, fields))
        watch = StreamWatch()
        try:
            async for event in call:
                yield watch.saw(event)
        except grpc.RpcError as err:
            watch.failed(err)
        finally:
            call.cancel()

    async def submit(
        self,
        prompt: str | pb.GenerateRequest | None = None,
        *,
        webhook_url: str = "",
        timeout: float | None = None,
        **fields: Any,
    ) -> str:
        return await self._run(self._submit_call(prompt, webhook_url=webhook_url, timeout=timeout, **fields))

    async def status(self, request_id: str, *, logs: bool = False, timeout: float | None = None) -> pb.StatusResponse:
        return await self._run(self._status_call(request_id, logs, timeout))

    async def result(self, request_id: str, *, timeout: float | None = None) -> pb.GenerateResult:
        return await self._run(self._result_call(request_id, timeout))

    async def cancel(self, request_id: str, *, timeout: float | None = None) -> pb.CancelResponse:
        return await self._run(self._cancel_call(request_id, timeout))

    async def subscribe(
        self,
        prompt: str | pb.GenerateRequest | None = None,
        *,
        on_update: Callable[[pb.StatusResponse], None] | None = None,
        with_logs: bool = False,
        poll_interval: float = 0.1,
        webhook_url: str = "",
        **fields: Any,
    ) -> pb.GenerateResult:
        return await self._carry_out(
            self._subscribe_plan(prompt, on_update, with_logs, poll_interval, webhook_url, fields)
        )
