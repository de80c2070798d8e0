"""A request as the server tracks it between acceptance and its recorded outcome, and the ways it can stop early.

A `WorkItem` is plain data. Who writes which part: the scheduler moves it between waiting and running (`state` up to
IN_PROGRESS, `started`, `group`); the engine loop keeps the engine's state of it (`generation`) while it runs; the
output side writes what happened (`progress`, `logs`, `outcome` and the terminal `state`). Everyone else reads.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from engine.request import Cancelled, GenerationRequest, GenerationResult
from server.storage.ids import new_request_id
from server.storage.states import State


class QueueFull(Exception):
    """More requests than max_queue are waiting."""


@dataclass(frozen=True)
class Limits:
    """A tenant's (an API key's) limits; None: unlimited."""

    max_active: int | None = None  # requests queued or running at once
    rate: float | None = None  # requests accepted per second


class TenantLimit(Exception):
    """A key's own limit (requests in flight, or per second) is reached; the message names it."""


class Unavailable(Exception):
    """The server takes no new work now (still loading the engine, or shutting down); the message says which."""


class Draining(Unavailable):
    """The server is shutting down and takes no new work."""

    def __init__(self, message: str = "the server is shutting down; retry elsewhere"):
        super().__init__(message)


class ShutdownAbort(Exception):
    """Running work was stopped because the shutdown grace period ran out."""


class DeadlineExceeded(Cancelled):
    """The caller's deadline passed before the work ended."""


@dataclass(eq=False)
class WorkItem:
    """One request from acceptance to its outcome."""

    request: GenerationRequest
    durable: bool = False  # stored in the queue (Submit), as opposed to a call that waits for its answer
    webhook_url: str = ""
    origin: str = "grpc"  # the API it came through: the shape of its webhook
    request_bytes: bytes = b""  # the serialized pixart.v1.GenerateRequest as stored (durable ones)
    claim: int = 0  # durable: the attempt number of this replica's claim on it (the store's fencing token)
    deadline: float | None = None  # time.monotonic() after which the work stops
    id: str = field(default_factory=new_request_id)
    group: Hashable = None  # requests of one group (size bin) can share a step
    state: State = State.IN_QUEUE
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancel_requested: bool = False
    settled: bool = False  # its outcome is decided (finishing): a cancel can no longer change it
    tenant: str = ""  # who submitted it (an API key's name): admission takes turns between tenants
    progress: tuple[int, int] = (0, 0)
    logs: list[dict] = field(default_factory=list)
    preview: Previewed | None = None  # the latest, while it runs here (status streams show it)
    outcome: GenerationResult | BaseException | None = None
    generation: Any = None  # the engine's state while it runs

    @property
    def images(self) -> int:
        return int(self.request.num_images)

    @property
    def queue_s(self) -> float:
        return (self.started if self.started is not None else time.monotonic()) - self.enqueued

    def should_stop(self, now: float) -> BaseException | None:
        """Why it must stop now (cancelled, or past its deadline), or None."""
        if self.cancel_requested:
            return Cancelled()
        if self.deadline is not None and now > self.deadline:
            return DeadlineExceeded()
        return None


def final_state(outcome: GenerationResult | BaseException) -> State:
    """The state an outcome ends a request in: a deadline is a failure, a cancel is not."""
    if isinstance(outcome, GenerationResult):
        return State.COMPLETED
    if isinstance(outcome, Cancelled) and not isinstance(outcome, DeadlineExceeded):
        return State.CANCELED
    return State.FAILED


def log_line(message: str, level: str = "INFO") -> dict:
    return {"message": message, "level": level, "timestamp": time.time()}


# -- what a caller waiting on its request hears, in order: positions, steps and log lines, then Done --------------
@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Stepped:
    step: int
    total: int


@dataclass(frozen=True)
class Previewed:
    """A preview of the first image after `step` of `total` (engine/preview.py): JPEG bytes."""

    step: int
    total: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Logged:
    line: dict


@dataclass(frozen=True)
class Done:
    outcome: GenerationResult | BaseException


Update = Queued | Stepped | Previewed | Logged | Done
