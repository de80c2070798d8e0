"""What the sync and asyncio clients share: channel settings and metadata, each call's message and timeout, error
translation, and the decisions of `stream` and `subscribe`, written as plans the two clients carry out.

A plan is a generator that yields what to do next, a `Call` (one unary RPC) or a `Sleep`, and is sent the call's
answer; its return value is the method's. `Client` runs a plan by blocking, `AsyncClient` by awaiting: all the
deciding happens here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_status import rpc_status

from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc
from server.api.limits import MAX_RESPONSE_BYTES
from server.core import records

DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = MAX_RESPONSE_BYTES  # the server's send limit: 8 PNGs at 2048² fit
TERMINAL_STATES = (pb.COMPLETED, pb.FAILED, pb.CANCELED)
FINAL_EVENTS = ("result", "error")  # a stream's last event; the call then ends with the same status


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
        violations = records.violations_from_status(status) if status is not None else []
        return cls(err.code(), err.details() or "", violations)

    @classmethod
    def from_status(cls, status: Any) -> PixArtError:
        return cls(records.grpc_code(status), status.message, records.violations_from_status(status))


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
                msg.image_size_preset = records.IMAGE_SIZE_NUMBERS[value]
            else:
                msg.image_size_custom.SetInParent()  # a side given as None stays unset (the server refuses it)
                width, height = value
                if width is not None:
                    msg.image_size_custom.width = int(width)
                if height is not None:
                    msg.image_size_custom.height = int(height)
        elif name == "style":
            msg.style = records.STYLE_NUMBERS[value] if isinstance(value, str) else value
        elif name == "scheduler":
            msg.scheduler = records.SCHEDULER_NUMBERS[value] if isinstance(value, str) else value
        elif name == "output_format":
            msg.output_format = records.OUTPUT_FORMAT_NUMBERS[value] if isinstance(value, str) else value
        elif name == "step_cache":
            msg.step_cache = records.STEP_CACHE_NUMBERS[value] if isinstance(value, str) else value
        else:
            setattr(msg, name, value)
    return msg


def _reply(reply: Any) -> Any:
    return reply


@dataclass(frozen=True)
class Call:
    """One RPC: the stub's method name, the message, the timeout (None: the client's), and what of the reply the
    method returns."""

    method: str
    message: Any
    timeout: float | None = None
    unwrap: Callable[[Any], Any] = _reply


@dataclass(frozen=True)
class Sleep:
    """A pause between two polls."""

    seconds: float


Plan = Generator[Call | Sleep, Any, Any]


class ClientCore:
    """A client's channel, metadata, timeouts, calls and decisions; `Client` and `AsyncClient` add the waiting.

    `_channels` is the module whose channels a client opens: grpc (blocking) or grpc.aio.
    """

    _channels: Any = grpc

    def __init__(
        self,
        address: str | None = None,
        key: str | None = None,
        *,
        tls: bool | None = None,
        root_certificates: str | bytes | None = None,
        timeout: float | None = None,
    ):
        self.address, self.timeout = address or DEFAULT_ADDRESS, timeout
        self._metadata = [("authorization", f"Key {key}")] if key else []
        if isinstance(root_certificates, str):
            root_certificates = Path(root_certificates).read_bytes()
        credentials = None
        if tls or root_certificates:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if credentials is not None:
            self._channel = self._channels.secure_channel(self.address, credentials, options=options)
        else:
            self._channel = self._channels.insecure_channel(self.address, options=options)
        self._stub = pb_grpc.PixArtStub(self._channel)

    def _start(self, call: Call) -> Any:
        """Make `call` with the client's metadata and timeout: the reply (blocking), an awaitable (asyncio), or for
        a stream the call to iterate."""
        timeout = call.timeout if call.timeout is not None else self.timeout
        return getattr(self._stub, call.method)(call.message, metadata=self._metadata, timeout=timeout)

    # ---- each method's call ---------------------------------------------------------------------------------

    @staticmethod
    def _stream_call(prompt: str | pb.GenerateRequest | None, timeout: float | None, fields: dict) -> Call:
        return Call("GenerateStream", make_request(prompt, **fields), timeout)

    @staticmethod
    def _generate_call(prompt: str | pb.GenerateRequest | None, timeout: float | None, fields: dict) -> Call:
        return Call("Generate", make_request(prompt, **fields), timeout)

    @staticmethod
    def _submit_call(
        prompt: str | pb.GenerateRequest | None, *, webhook_url: str = "", timeout: float | None = None, **fields: Any
    ) -> Call:
        msg = pb.SubmitRequest(request=make_request(prompt, **fields), webhook_url=webhook_url)
        return Call("Submit", msg, timeout, lambda reply: reply.request_id)

    @staticmethod
    def _status_call(request_id: str, logs: bool, timeout: float | None) -> Call:
        return Call("Status", pb.StatusRequest(request_id=request_id, logs=logs), timeout)

    @staticmethod
    def _result_call(request_id: str, timeout: float | None) -> Call:
        return Call("Result", pb.RequestRef(request_id=request_id), timeout)

    @staticmethod
    def _cancel_call(request_id: str, timeout: float | None) -> Call:
        return Call("Cancel", pb.RequestRef(request_id=request_id), timeout)

    # ---- the decisions ----------------------------------------------------------------------------------------

    def _subscribe_plan(
        self,
        prompt: str | pb.GenerateRequest | None,
        on_update: Callable[[pb.StatusResponse], None] | None,
        with_logs: bool,
        poll_interval: float,
        webhook_url: str,
        fields: dict,
    ) -> Plan:
        """Submit, report every status until the request ends, then its result (or raise its error)."""
        request_id = yield self._submit_call(prompt, webhook_url=webhook_url, **fields)
        while True:
            status = yield self._status_call(request_id, with_logs, None)
            if on_update is not None:
                on_update(status)
            if status.state in TERMINAL_STATES:
                break
            yield Sleep(poll_interval)
        if status.state != pb.COMPLETED:
            raise (
                PixArtError.from_status(status.error)
                if status.HasField("error")
                else PixArtError(
                    grpc.StatusCode.CANCELLED, f"request {request_id} was {pb.RequestState.Name(status.state)}"
                )
            )
        return (yield self._result_call(request_id, None))


class StreamWatch:
    """A stream's decisions: after a final event the call ends with the status that event already told, so that
    ending is not raised; any other failure is, as PixArtError."""

    def __init__(self) -> None:
        self.got_final = False

    def saw(self, event: pb.GenerateEvent) -> pb.GenerateEvent:
        self.got_final = event.WhichOneof("event") in FINAL_EVENTS
        return event

    def failed(self, err: grpc.RpcError) -> None:
        if not self.got_final:
            raise PixArtError.from_rpc(err) from None
