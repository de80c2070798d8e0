"""The request service: what every transport does with a request, written once.

gRPC, fal's HTTP queue and any later transport are adapters over this: they translate their wire format into a
`GenerationRequest` and call

    submit(request, webhook_url)   -> (id, queue position)     durable: committed to the store before it answers
    start(request, deadline)       -> Call                      run here while the caller waits: updates, outcome
    lookup(id)                     -> Lookup | None             where a request is, here or in the store
    cancel(id)                     -> "queued" | "running" | "ended" | "unknown"
    result(item) / stored(row)     -> pb.GenerateResult         with inline bytes or expiring URLs

Validation happens here (`violations`: the engine's field rules and the webhook policy), once per request, before
anything is accepted; refusals are exceptions the adapters map to their own codes: `InvalidRequest` (every bad
field), `Unavailable` (loading, or shutting down: `Draining`) and `QueueFull`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from google.rpc import status_pb2

from engine.request import Cancelled, GenerationRequest, GenerationResult, InvalidRequest
from protos.pixart.v1 import pixart_pb2 as pb
from server.observability.metrics import Metrics
from server.storage import Row, Store, new_request_id
from server.storage.states import CANCELED, IN_PROGRESS, IN_QUEUE, TERMINAL
from server.webhooks import WebhookPolicy

from . import records
from .deliveries import WebhookDeliveries
from .engine_loop import EngineLoop
from .links import ResultLinks
from .outputs import Outputs
from .work import Done, Draining, Limits, Previewed, QueueFull, TenantLimit, Unavailable, Update, WorkItem, log_line

log = logging.getLogger("pixart.server")
LOADING = "the engine is still loading; retry shortly"
STORE_AWAY = "the store cannot be reached now (its database is down or restarting); retry shortly"
# A status stream of a request live on this replica wakes on its events (at least every KEEPALIVE_S, for a
# keep-alive); one queued in the store or running on another replica is read from the store every REMOTE_POLL_S.
KEEPALIVE_S, REMOTE_POLL_S = 15.0, 1.0


@dataclass
class Lookup:
    """A request's state for Status/Result calls, whichever transport asks."""

    request_id: str
    state: str
    queue_position: int = 0
    progress: tuple[int, int] = (0, 0)
    logs: list[dict] = field(default_factory=list)
    error: status_pb2.Status | None = None
    row: Row | None = None  # the stored row, once it has ended (its result and files)
    preview: Previewed | None = None  # the latest preview, while it runs on this replica


class Requests(Protocol):
    """What a transport needs of the service (RequestService is one): the narrow interface adapters depend on."""

    max_queue: int

    @property
    def ready(self) -> bool: ...

    def unavailable(self) -> Unavailable | None: ...

    def violations(self, request: GenerationRequest, webhook_url: str = "") -> list[tuple[str, str]]: ...

    async def submit(self, request: GenerationRequest, *, webhook_url: str = "", origin: str = "grpc",
                     request_bytes: bytes | None = None, tenant: str = "") -> tuple[str, int]: ...

    async def start(self, request: GenerationRequest, *, deadline: float | None = None,
                    method: str = "Generate", tenant: str = "") -> Call: ...

    async def lookup(self, request_id: str, viewer: str | None = None) -> Lookup | None: ...

    async def cancel(self, request_id: str, viewer: str | None = None) -> str: ...

    async def changed(self, request_id: str) -> None: ...

    def result(self, item: WorkItem) -> pb.GenerateResult: ...

    def stored(self, row: Row) -> pb.GenerateResult: ...


class Claimer(Protocol):
    """The replica's side of the durable queue, as the service needs it."""

    async def claim(self) -> None: ...

    def wake(self) -> None: ...


class Call:
    """A request this replica runs while its caller waits: its updates, ending with Done."""

    def __init__(self, service: RequestService, item: WorkItem, updates: asyncio.Queue[Update], position: int):
        self.service, self.item, self._updates, self.position = service, item, updates, position

    @property
    def id(self) -> str:
        return self.item.id

    async def updates(self) -> AsyncIterator[Update]:
        """Queue positions, steps and log lines as they happen, then Done."""
        while True:
            update = await self._updates.get()
            yield update
            if isinstance(update, Done):
                return

    async def outcome(self) -> GenerationResult | BaseException:
        async for update in self.updates():
            if isinstance(update, Done):
                return update.outcome
        raise AssertionError("unreachable: updates end with Done")

    def cancel(self) -> None:
        """The caller went away: free its place in the queue, or stop it at the next step."""
        self.service.abandon(self.item)


class RequestService:
    def __init__(self, store: Store, outputs: Outputs, links: ResultLinks, webhooks: WebhookDeliveries,
                 policy: WebhookPolicy, metrics: Metrics, *, max_queue: int,
                 limits: Callable[[str], Limits] = lambda tenant: Limits()):
        """`limits`: a tenant's (its key's) limits on requests in flight and per second."""
        self.store, self.outputs, self.links, self.webhooks = store, outputs, links, webhooks
        self.policy, self.metrics, self.max_queue, self.limits = policy, metrics, max_queue, limits
        self.loop: EngineLoop | None = None  # attached once the engine is loaded
        self.replica: Claimer | None = None
        self.draining = False
        self.store_reachable = True  # as this replica's queue work last found it (Replica tells)

    def attach(self, loop: EngineLoop, replica: Claimer) -> None:
        self.loop, self.replica = loop, replica

    # -- readiness and validation ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.unavailable() is None

    def unavailable(self) -> Unavailable | None:
        """Why no new work is taken now, or None."""
        if self.draining:
            return Draining()
        if self.loop is None:
            return Unavailable(LOADING)
        if not self.store_reachable:
            return Unavailable(STORE_AWAY)
        return None

    def violations(self, request: GenerationRequest, webhook_url: str = "") -> list[tuple[str, str]]:
        """Every bad field: the webhook policy's and the engine's rules (the request's own included)."""
        return self.policy.violations(webhook_url) + self.loop.engine.violations(request)

    def check(self, request: GenerationRequest, webhook_url: str = "") -> None:
        """Raise what refuses this request now: Unavailable, or InvalidRequest naming every bad field."""
        if (refusal := self.unavailable()) is not None:
            raise refusal
        violations = self.violations(request, webhook_url)
        if violations:
            log.info("refused", extra={"violations": [f"{f}: {rule}" for f, rule in violations]})
            raise InvalidRequest(violations)

    # -- the durable queue -----------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, *, webhook_url: str = "", origin: str = "grpc",
                     request_bytes: bytes | None = None, tenant: str = "") -> tuple[str, int]:
        """Store a request in the shared queue; (id, queue position). The row is committed before the id is
        returned; this replica then claims work at once if it has room (whichever replica has room runs it).
        `tenant`: the name of the key that sent it (claims and admission take turns between tenants)."""
        self.check(request, webhook_url)
        data = request_bytes or records.request_to_proto(request).SerializeToString()
        request_id = new_request_id()

        calls = self._calls_of(tenant)

        def add() -> None:
            if self.store.queued() >= self.max_queue:
                raise QueueFull()
            self._check_limits(tenant, calls)
            self.store.add(request_id, data, webhook_url, origin, tenant)

        await asyncio.to_thread(add)
        log.info("accepted", extra={"request_id": request_id, "origin": origin, "tenant": tenant})
        try:  # committed: from here on the answer is the id, whatever the store does next
            await self.replica.claim()
            item = self.outputs.live.get(request_id)
            position = self.loop.position(item) if item is not None else None
            if position is None:
                position = 0 if item is not None else await asyncio.to_thread(self.store.position, request_id)
        except Exception:  # noqa: BLE001 - whatever fails now, the request is accepted: answering an error would
            # make the caller retry and run it twice. The replicas claim it once they can; its place is unknown.
            log.warning("accepted, but its claim or position failed", extra={"request_id": request_id},
                        exc_info=True)
            position = 0
        return request_id, position

    # -- calls that wait -------------------------------------------------------------------------------------
    async def start(self, request: GenerationRequest, *, deadline: float | None = None,
                    method: str = "Generate", tenant: str = "") -> Call:
        """Queue a request to run here while its caller waits (not stored unless its images need URLs)."""
        self.check(request)
        if self.limits(tenant) != Limits():  # no store read for an unlimited key
            await asyncio.to_thread(self._check_limits, tenant, self._calls_of(tenant))
        item = WorkItem(request, deadline=deadline, tenant=tenant)
        self.outputs.track(item)
        updates = self.outputs.watch(item)
        try:
            position = self.loop.submit(item)
        except (QueueFull, Draining):
            self.outputs.untrack(item)
            raise
        log.info("accepted", extra={"request_id": item.id, "method": method, "tenant": tenant})
        return Call(self, item, updates, position)

    def _calls_of(self, tenant: str) -> list[float]:
        """When each of the tenant's calls waiting here (not stored) was accepted (on the event loop)."""
        return [i.enqueued for i in self.outputs.live.values() if i.tenant == tenant and not i.durable]

    def _check_limits(self, tenant: str, calls: list[float]) -> None:
        """TenantLimit when the tenant's key has as many requests in flight, or accepted within its rate's window,
        as it may: its durable ones counted in the store (across replicas; checked, then inserted, so replicas
        racing may let a few more through) and its `calls` waiting here. In a worker thread."""
        limits = self.limits(tenant)
        if limits == Limits():
            return
        window = max(1.0, 1.0 / limits.rate) if limits.rate else 1.0
        active, recent = self.store.tenant_load(tenant, time.time() - window)
        active += len(calls)
        recent += sum(1 for accepted in calls if accepted >= time.monotonic() - window)
        if limits.max_active is not None and active >= limits.max_active:
            raise TenantLimit(f"this key's tenant {tenant!r} has {limits.max_active} requests in flight, its "
                              "max_active; retry when one ends")
        if limits.rate is not None and recent >= limits.rate * window:
            raise TenantLimit(f"this key's tenant {tenant!r} sends more than {limits.rate:g} requests per second, its "
                              "rate; retry shortly")

    def abandon(self, item: WorkItem) -> None:
        if self.loop is not None and self.loop.cancel(item) == "queued":
            self.outputs.spawn(self.outputs.complete(item, Cancelled()))

    # -- any request, wherever it runs -----------------------------------------------------------------------
    async def lookup(self, request_id: str, viewer: str | None = None) -> Lookup | None:
        """Where a request is: live here, or in the store (wherever it runs); None when unknown or expired, or not
        `viewer`'s (a tenant's name; None: whoever's)."""
        item = self.outputs.live.get(request_id)
        if item is not None and not _visible(item.tenant, viewer):
            return None
        if item is not None and item.state in (IN_QUEUE, IN_PROGRESS):
            position = self.loop.position(item) if item.state == IN_QUEUE and self.loop is not None else None
            return Lookup(item.id, str(item.state), position or 0, item.progress, list(item.logs),
                          preview=item.preview)
        row = await asyncio.to_thread(self.store.get, request_id)
        if row is None or not _visible(row.tenant, viewer):
            return None
        if row.state == IN_QUEUE:
            position = await asyncio.to_thread(self.store.position, request_id)
            return Lookup(row.id, row.state, position, (0, 0), row.logs)
        if row.state == IN_PROGRESS:
            return Lookup(row.id, row.state, 0, row.progress, row.logs)
        error = status_pb2.Status.FromString(row.error) if row.error else None
        return Lookup(row.id, row.state, 0, (0, 0), row.logs, error, row)

    async def changed(self, request_id: str) -> None:
        """Until a request may have changed: its next update when it is live here (woken by the engine's events,
        or after KEEPALIVE_S), else after REMOTE_POLL_S, which is how often a follower reads the store for a
        request queued in it or running on another replica."""
        if not await self.outputs.changed(request_id, KEEPALIVE_S):
            await asyncio.sleep(REMOTE_POLL_S)

    async def cancel(self, request_id: str, viewer: str | None = None) -> str:
        """"queued" (it will not run), "running" (it ends CANCELED: at its next step, or, past its last one, when
        its result would have been recorded; here or on the replica that runs it, and across a crash), "ended"
        (its outcome was already decided) or "unknown" (also when it is not `viewer`'s)."""
        item = self.outputs.live.get(request_id)
        if item is not None and not _visible(item.tenant, viewer):
            return "unknown"
        if item is not None:
            # committed before the answer: a crash after "cancellation requested" must not rerun it, and the
            # store's finish turns the outcome into CANCELED under the row's lock
            if item.durable and not await asyncio.to_thread(self.store.request_cancel, request_id):
                return "ended"
            outcome = self.loop.cancel(item) if self.loop is not None else None
            if outcome == "queued":
                await self.outputs.complete(item, Cancelled())
            if outcome is not None:
                return outcome
            if not item.durable:  # its outcome is decided and on its way to its caller
                return "ended"
        row = await asyncio.to_thread(self.store.get, request_id)
        if row is None or not _visible(row.tenant, viewer):
            return "unknown"
        if row.state in TERMINAL:
            return "ended"
        # not here: the flag first, so that whichever replica holds or next claims it sees it
        if not await asyncio.to_thread(self.store.request_cancel, request_id):
            return "ended"
        if await asyncio.to_thread(self.store.cancel_queued, request_id, [*row.logs, log_line("canceled")]):
            self.metrics.outcomes.labels(CANCELED).inc()
            if row.webhook_url:
                self.webhooks.schedule(request_id)
            return "queued"
        if self.replica is not None:
            self.replica.wake()
        return "running"

    # -- results ---------------------------------------------------------------------------------------------
    def result(self, item: WorkItem) -> pb.GenerateResult:
        return self.links.result(item)

    def stored(self, row: Row) -> pb.GenerateResult:
        """A COMPLETED row's result (blocking: it may read image bytes from the store; call it off the loop)."""
        return self.links.stored(row)


def _visible(tenant: str, viewer: str | None) -> bool:
    """Whether a request of `tenant` is `viewer`'s to see (None: an admin, or a server without keys)."""
    return viewer is None or tenant == viewer
