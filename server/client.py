"""Python clients for the pixart.v1 service, sync (`Client`) and asyncio (`AsyncClient`), shaped like fal's:
generate, stream, submit, status, result, cancel and subscribe(on_update=...).

Requests can be given as a pixart.v1.GenerateRequest or as keyword fields with the public API's spellings
(`image_size="square"` or `(640, 480)`, `style="Anime"`, `scheduler="SA-SOLVER"`, `output_format="jpeg"`).
The address defaults to 127.0.0.1:50051; `key` is sent as `authorization: Key <key>` metadata when given.
Errors are raised as PixArtError, which carries the status code and BadRequest field violations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_status import rpc_status

from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc

from . import convert

DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the server's send limit: 8 PNGs at 2048² fit
TERMINAL_STATES = (pb.COMPLETED, pb.FAILED, pb.CANCELED)


class PixArtError(Exception):
    """A failed call: `code` (grpc.StatusCode), `message`, and `violations` [(field, rule)] for INVALID_ARGUMENT."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[tuple[str, str]] | None = None):
        self.code, self.message, self.violations = code, message, violations or []
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> PixArtError:
        status = None
        try:
            status = rpc_status.from_call(err)
        except Exception:  # malformed details must not hide the error itself
            status = None
        violations = convert.violations_from_status(status) if status is not None else []
        return cls(err.code(), err.details() or "", violations)

    @classmethod
    def from_status(cls, status: Any) -> PixArtError:
        return cls(convert.grpc_code(status), status.message, convert.violations_from_status(status))


def make_request(prompt: str | pb.GenerateRequest | None = None, **fields: Any) -> pb.GenerateRequest:
    """A GenerateRequest from keyword fields; fields left out stay unset, so the server's defaults apply."""
    if isinstance(prompt, pb.GenerateRequest):
        if fields:
            raise TypeError("give either a GenerateRequest or keyword fields, not both")
        return prompt
    msg = pb.GenerateRequest(prompt=prompt or "")
    for name, value in fields.items():
        if value is None:
            continue
        if name == "image_size":
            if isinstance(value, str):
                msg.image_size_preset = convert.IMAGE_SIZE_NUMBERS[value]
            else:
                msg.image_size_custom.SetInParent()  # a side given as None stays unset (the server refuses it)
                width, height = value
                if width is not None:
                    msg.image_size_custom.width = int(width)
                if height is not None:
                    msg.image_size_custom.height = int(height)
        elif name == "style":
            msg.style = convert.STYLE_NUMBERS[value] if isinstance(value, str) else value
        elif name == "scheduler":
            msg.scheduler = convert.SCHEDULER_NUMBERS[value] if isinstance(value, str) else value
        elif name == "output_format":
            msg.output_format = convert.OUTPUT_FORMAT_NUMBERS[value] if isinstance(value, str) else value
        else:
            setattr(msg, name, value)
    return msg


def _channel_args(
    address: str | None, key: str | None, tls: bool | None, root_certificates: str | bytes | None
) -> tuple[str, list[tuple[str, str]], grpc.ChannelCredentials | None, list]:
    address = address or DEFAULT_ADDRESS
    metadata = [("authorization", f"Key {key}")] if key else []
    if isinstance(root_certificates, str):
        root_certificates = Path(root_certificates).read_bytes()
    creds = None
    if tls or root_certificates:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return address, metadata, creds, options


class Client:
    """Blocking client. Use as a context manager or call close()."""

    def __init__(
        self,
        address: str | None = None,
        key: str | None = None,
        *,
        tls: bool | None = None,
        root_certificates: str | bytes | None = None,
        timeout: float | None = None,
    ):
        address, self._metadata, creds, options = _channel_args(address, key, tls, root_certificates)
        self.address, self.timeout = address, timeout
        if creds is not None:
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.PixArtStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def _call(self, method: Callable, msg: Any, timeout: float | None) -> Any:
        try:
            return method(msg, metadata=self._metadata, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as err:
            raise PixArtError.from_rpc(err) from None

    def generate(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.GenerateResult:
        return self._call(self._stub.Generate, make_request(prompt, **fields), timeout)

    def stream(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> Iterator[pb.GenerateEvent]:
        """Events as they come; the last is the result or the error (an error event is not raised)."""
        call = self._stub.GenerateStream(
            make_request(prompt, **fields),
            metadata=self._metadata,
            timeout=timeout if timeout is not None else self.timeout,
        )
        got_final = False
        try:
            for event in call:
                got_final = event.WhichOneof("event") in ("result", "error")
                yield event
        except grpc.RpcError as err:
            if not got_final:  # after an error event the call ends with the same status: already told
                raise PixArtError.from_rpc(err) from None
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
        msg = pb.SubmitRequest(request=make_request(prompt, **fields), webhook_url=webhook_url)
        return self._call(self._stub.Submit, msg, timeout).request_id

    def status(self, request_id: str, *, logs: bool = False, timeout: float | None = None) -> pb.StatusResponse:
        return self._call(self._stub.Status, pb.StatusRequest(request_id=request_id, logs=logs), timeout)

    def result(self, request_id: str, *, timeout: float | None = None) -> pb.GenerateResult:
        return self._call(self._stub.Result, pb.RequestRef(request_id=request_id), timeout)

    def cancel(self, request_id: str, *, timeout: float | None = None) -> pb.CancelResponse:
        return self._call(self._stub.Cancel, pb.RequestRef(request_id=request_id), timeout)

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
        request_id = self.submit(prompt, webhook_url=webhook_url, **fields)
        while True:
            status = self.status(request_id, logs=with_logs)
            if on_update is not None:
                on_update(status)
            if status.state in TERMINAL_STATES:
                break
            time.sleep(poll_interval)
        if status.state != pb.COMPLETED:
            raise (
                PixArtError.from_status(status.error)
                if status.HasField("error")
                else PixArtError(
                    grpc.StatusCode.CANCELLED, f"request {request_id} was {pb.RequestState.Name(status.state)}"
                )
            )
        return self.result(request_id)


class AsyncClient:
    """asyncio client; the same calls as Client, awaited (stream is an async iterator)."""

    def __init__(
        self,
        address: str | None = None,
        key: str | None = None,
        *,
        tls: bool | None = None,
        root_certificates: str | bytes | None = None,
        timeout: float | None = None,
    ):
        address, self._metadata, creds, options = _channel_args(address, key, tls, root_certificates)
        self.address, self.timeout = address, timeout
        if creds is not None:
            self._channel = grpc.aio.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = pb_grpc.PixArtStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Callable, msg: Any, timeout: float | None) -> Any:
        try:
            return await method(msg, metadata=self._metadata, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as err:
            raise PixArtError.from_rpc(err) from None

    async def generate(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> pb.GenerateResult:
        return await self._call(self._stub.Generate, make_request(prompt, **fields), timeout)

    async def stream(
        self, prompt: str | pb.GenerateRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> AsyncIterator[pb.GenerateEvent]:
        call = self._stub.GenerateStream(
            make_request(prompt, **fields),
            metadata=self._metadata,
            timeout=timeout if timeout is not None else self.timeout,
        )
        got_final = False
        try:
            async for event in call:
                got_final = event.WhichOneof("event") in ("result", "error")
                yield event
        except grpc.RpcError as err:
            if not got_final:
                raise PixArtError.from_rpc(err) from None
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
        msg = pb.SubmitRequest(request=make_request(prompt, **fields), webhook_url=webhook_url)
        return (await self._call(self._stub.Submit, msg, timeout)).request_id

    async def status(self, request_id: str, *, logs: bool = False, timeout: float | None = None) -> pb.StatusResponse:
        return await self._call(self._stub.Status, pb.StatusRequest(request_id=request_id, logs=logs), timeout)

    async def result(self, request_id: str, *, timeout: float | None = None) -> pb.GenerateResult:
        return await self._call(self._stub.Result, pb.RequestRef(request_id=request_id), timeout)

    async def cancel(self, request_id: str, *, timeout: float | None = None) -> pb.CancelResponse:
        return await self._call(self._stub.Cancel, pb.RequestRef(request_id=request_id), timeout)

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
        request_id = await self.submit(prompt, webhook_url=webhook_url, **fields)
        while True:
            status = await self.status(request_id, logs=with_logs)
            if on_update is not None:
                on_update(status)
            if status.state in TERMINAL_STATES:
                break
            await asyncio.sleep(poll_interval)
        if status.state != pb.COMPLETED:
            raise (
                PixArtError.from_status(status.error)
                if status.HasField("error")
                else PixArtError(
                    grpc.StatusCode.CANCELLED, f"request {request_id} was {pb.RequestState.Name(status.state)}"
                )
            )
        return await self.result(request_id)
