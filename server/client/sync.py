"""The blocking client: the core's calls and plans, carried out by blocking."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from protos.pixart.v1 import pixart_pb2 as pb

from .core import Call, ClientCore, PixArtError, Plan, Sleep, StreamWatch


class Client(ClientCore):
    """Blocking client. Use as a context manager or call close()."""

    _channels = grpc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def _run(self, call: Call) -> Any:
        try:
            reply = self._start(call)
        except grpc.RpcError as err:
            raise PixArtError.from_rpc(err) from None
        return call.unwrap(reply)

    def _carry_out(self, plan: Plan) -> Any:
        answer = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as done:
                return done.value
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                answer = None
            else:
                answer = self._run(step)

    def generate(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.GenerateResult:
        return self._run(self._generate_call(prompt, timeout, fields))

    def stream(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> Iterator[pb.GenerateEvent]:
        """Events as they come; the last is the result or the error (an error event is not raised)."""
        call = self._start(self._stream_call(prompt, timeout, fields))
        watch = StreamWatch()
        try:
            for event in call:
                yield watch.saw(event)
        except grpc.RpcError as err:
            watch.failed(err)
        finally:
            call.cancel()

    def submit(
        self,
        prompt: str | pb.GenerateRequest | None = None,
        *,
        webhook_url: str = "",
        timeout: float | None = None,
        **fields: Any,
    ) -> str:
        return self._run(self._submit_call(prompt, webhook_url=webhook_url, timeout=timeout, **fields))

    def status(self, request_id: str, *, logs: bool = False, timeout: float | None = None) -> pb.StatusResponse:
        return self._run(self._status_call(request_id, logs, timeout))

    def result(self, request_id: str, *, timeout: float | None = None) -> pb.GenerateResult:
        return self._run(self._result_call(request_id, timeout))

    def cancel(self, request_id: str, *, timeout: float | None = None) -> pb.CancelResponse:
        return self._run(self._cancel_call(request_id, timeout))

    def subscribe(
        self,
        prompt: str | pb.GenerateRequest | None = None,
        *,
        on_update: Callable[[pb.StatusResponse], None] | None = None,
        with_logs: bool = False,
        poll_interval: float = 0.1,
        webhook_url: str = "",
        **fields: Any,
    ) -> pb.GenerateResult:
        """Submit, report every status until the request ends, then return its result (or raise its error)."""
        return self._carry_out(self._subscribe_plan(prompt, on_update, with_logs, poll_interval, webhook_url, fields))
