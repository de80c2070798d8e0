"""Bounds on the HTTP port's connections, below the app: how many, from one address, and how long each phase of a
request may take. The HTTP port shares its event loop, threads, store and file descriptors with gRPC and the engine,
so a client that opens thousands of sockets, trickles a header line every few seconds, sends a body slowly or never
reads its response must cost a bounded amount and then be let go.

uvicorn bounds none of this by itself: its keep-alive timer restarts on every byte received, and nothing times a
request's headers, its body or a response the client does not read. `GuardedH11` is uvicorn's HTTP/1.1 protocol
with these deadlines added (the same parser, h11, whatever else is installed):

- a connection past `max_connections` in all, or past `max_per_address` from one client address, is answered 503
  with Retry-After and closed before anything is read;
- the headers of each request must be complete within `header_timeout_s` of the connection (or of the previous
  response), however slowly they trickle in;
- a request's body must be complete within `body_timeout_s` of its headers;
- a response the client stops reading (the write buffer stays full) is abandoned after `write_timeout_s`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.limits import RETRY_AFTER_S

log = logging.getLogger("pixart.server.http")

_BUSY = b'{"detail": "too many connections; retry later"}'
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: "
           + str(RETRY_AFTER_S).encode() + b"\r\nconnection: close\r\ncontent-length: "
           + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)


@dataclass(frozen=True)
class ConnectionLimits:
    """The `--http-*` settings (server/config.py). `max_per_address` 0: no per-address limit."""

    max_connections: int
    max_per_address: int
    header_timeout_s: float
    body_timeout_s: float
    write_timeout_s: float


@dataclass
class ConnectionGuard:
    """The connections of one HTTP port: counted in all and per client address; what each was cut off for."""

    limits: ConnectionLimits
    on_cut: Callable[[str], None] = lambda reason: None
    open: Counter = field(default_factory=Counter)
    cut: Counter = field(default_factory=Counter)  # reason -> connections closed for it
    _last_log: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.open.values())

    def admit(self, address: str) -> bool:
        per_address = self.limits.max_per_address
        if self.total >= self.limits.max_connections or (per_address and self.open[address] >= per_address):
            self.note("too_many_connections")
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]

    def note(self, reason: str) -> None:
        """Count a connection cut off; log at most one line a minute, whatever an attacker does."""
        self.cut[reason] += 1
        self.on_cut(reason)
        now = time.monotonic()
        if now - self._last_log >= 60.0:
            self._last_log = now
            log.warning("HTTP connections cut off", extra={"reasons": dict(self.cut)})

    def protocol(self) -> Any:
        """What uvicorn's `http=` takes: a factory of protocols bound to this guard."""
        return functools.partial(GuardedH11, guard=self)


class GuardedH11(H11Protocol):
    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._address: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "headers" | "body" | None (handling, or answered)
        self._timed_cycle: Any = None

    # -- the connection -----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else "unknown"
        if not self.guard.admit(address):
            transport.write(REFUSAL)
            transport.close()
            return
        self._address = address
        self._expect("headers", self.guard.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._address is not None:
            self.guard.release(self._address)
            self._address = None
        self._disarm()
        if self._stalled is not None:
            self._stalled.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._address is None:  # refused: nothing it sends is read
            return
        super().data_received(data)
        self._progress()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # keep-alive: the next request's headers are due in time too
            self._expect("headers", self.guard.limits.header_timeout_s)
            self._progress()  # a pipelined request may have been read already

    # -- a response the client does not read --------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.guard.limits.write_timeout_s, self._cut, "slow_reader")

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    # -- deadlines ----------------------------------------------------------------------------------------------
    def _progress(self) -> None:
        """After bytes arrived: headers complete moves the deadline to the body; the body complete ends it."""
        cycle = self.cycle
        if self._waiting_for == "headers" and cycle is not None and cycle is not self._timed_cycle:
            self._timed_cycle = cycle
            self._expect("body", self.guard.limits.body_timeout_s)
        if self._waiting_for == "body" and cycle is not None and not cycle.more_body:
            self._disarm()

    def _expect(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(seconds, self._cut, f"slow_{what}")
        if what == "body":
            self._progress()  # a request without a body (or sent whole) is complete already

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None

    def _cut(self, reason: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.guard.note(reason)
        self.transport.close()
