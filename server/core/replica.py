"""This replica's share of the durable queue: claim work, keep the leases, hand back what it will not run.

The queue lives in the store, which several replicas may share (PostgreSQL). Every replica runs the same loop:
claim the oldest queued requests while its engine loop has room for them, renew the leases of what it holds
(publishing their progress, and hearing of cancels sent to other replicas), find webhooks nobody is delivering,
forget results past their time, and hand back what it has not started when it drains. A replica that dies stops
renewing; its requests are claimed again once their leases run out. While the store cannot be reached the loop
keeps trying every poll, and says so (`on_store`: the server's health and admission follow it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.request import Cancelled, GenerationRequest, InvalidRequest
from protos.pixart.v1 import pixart_pb2 as pb
from server.observability.metrics import Metrics
from server.storage import IN_PROGRESS, Row, Store, StoreUnavailable

from . import records
from .deliveries import WebhookDeliveries
from .engine_loop import EngineLoop
from .outputs import Outputs
from .work import WorkItem

log = logging.getLogger("pixart.server")


@dataclass(frozen=True)
class ReplicaConfig:
    name: str  # this replica in the store's claims
    lease_s: float = 30.0  # how long a claim lasts without renewal: a dead replica's work waits this long
    poll_s: float = 0.25  # how often it claims, renews and looks for cancels sent elsewhere
    claim_ahead: int = 4  # requests it holds waiting at most (the rest stay for other replicas)
    result_ttl_s: float = 24 * 3600.0  # how long an ended request stays retrievable


class Replica:
    def __init__(self, store: Store, loop: EngineLoop, outputs: Outputs, webhooks: WebhookDeliveries,
                 metrics: Metrics, config: ReplicaConfig,
                 violations: Callable[[GenerationRequest], list[tuple[str, str]]],
                 on_store: Callable[[bool], Awaitable[None]] | None = None):
        """`violations`: the service's validation, for stored requests (the engine may have changed since);
        `on_store`: told when the store becomes unreachable (False) and reachable again (True)."""
        self.store, self.loop, self.outputs, self.webhooks = store, loop, outputs, webhooks
        self.metrics, self.config, self.violations = metrics, config, violations
        self.on_store = on_store
        self.store_reachable = True
        self.draining = False
        self._claiming = asyncio.Lock()  # one claim at a time; the drain waits for the one under way
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await asyncio.to_thread(self.store.forget_claims)
        await self.claim()
        self._tasks += [asyncio.create_task(self._work()), asyncio.create_task(self._expire())]

    def wake(self) -> None:
        """Claim and renew now rather than at the next poll (a cancel was sent for work held elsewhere)."""
        self._wake.set()

    # -- claims ----------------------------------------------------------------------------------------------
    async def claim(self) -> None:
        """Take as many queued requests as the engine loop has room to start soon (`claim_ahead` waiting here at
        most), so that the rest stay in the shared queue for other replicas."""
        async with self._claiming:
            if self.draining:
                return
            room = self.config.claim_ahead - self.loop.waiting()
            if room <= 0:
                return
            rows = await asyncio.to_thread(self.store.claim, self.config.name, room, self.config.lease_s)
            for row in rows:
                await self._take(row)

    async def _take(self, row: Row) -> None:
        """Queue a claimed request here: a cancelled one ends, one the engine now refuses fails visibly."""
        request = records.request_from_proto(pb.GenerateRequest.FromString(row.request))
        item = WorkItem(request, durable=True, request_bytes=row.request, webhook_url=row.webhook_url,
                        origin=row.origin, id=row.id, claim=row.attempt, tenant=row.tenant)
        self.outputs.track(item)
        # outcomes are recorded on their own task: a store that goes away meanwhile (and is waited out) must not
        # hold the claim loop, its renewals, or a Submit that asked it to claim
        if row.cancel_requested:  # cancelled while queued elsewhere, or while a replica that died ran it
            self.outputs.spawn(self.outputs.complete(item, Cancelled()))
            return
        violations = self.violations(request)
        if violations:  # the engine changed under a stored request: it fails, visibly
            self.outputs.spawn(self.outputs.complete(item, InvalidRequest(violations)))
            return
        if row.attempt > 1:
            self.outputs.add_log(item, "recovered: it was claimed before by a replica that stopped (a server restart)")
            log.info("recovered", extra={"request_id": row.id, "attempt": row.attempt})
        self.loop.submit(item, force=True)

    async def renew(self) -> None:
        """Keep the leases of what runs or waits here, publish its progress, and stop what was cancelled through
        another replica (or what this replica lost: its lease ran out and someone else took it)."""
        mine = self.outputs.durable()
        if not mine:
            return
        progress = {item.id: item.progress for item in mine if item.state == IN_PROGRESS}
        held, cancelled = await asyncio.to_thread(self.store.renew, self.config.name, self.config.lease_s, progress)
        for item in mine:
            if self.outputs.live.get(item.id) is not item:
                continue  # it ended meanwhile
            if item.id not in held:
                log.warning("lost the claim (lease ran out); stopping", extra={"request_id": item.id})
            elif item.id not in cancelled:
                continue
            await self.stop(item)

    async def stop(self, item: WorkItem) -> None:
        """Stop a request held here: out of the queue at once, or at its next step if it runs."""
        if self.loop.cancel(item) == "queued":
            self.outputs.spawn(self.outputs.complete(item, Cancelled()))

    # -- the loops -------------------------------------------------------------------------------------------
    async def _work(self) -> None:
        """Every poll_s: claim, renew; now and then look for undelivered webhooks and the shared queue's depth."""
        next_sweep = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.claim()
                await self.renew()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + max(1.0, min(10.0, self.config.lease_s / 3))
                    self.metrics.store_queue_depth.set(await asyncio.to_thread(self.store.queued))
                    await self.webhooks.sweep()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:  # the database is away: keep trying, the leases say what is whose
                await self._store_found(False)
                continue
            except Exception:
                log.exception("queue work failed")
            else:
                await self._store_found(True)

    async def _store_found(self, reachable: bool) -> None:
        if reachable == self.store_reachable:
            return
        self.store_reachable = reachable
        if reachable:
            log.info("the store is reachable again")
        else:
            log.warning("the store cannot be reached; not serving new work until it is back")
        if self.on_store is not None:
            await self.on_store(reachable)

    async def _expire(self) -> None:
        period = max(1.0, min(60.0, self.config.result_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                n = await asyncio.to_thread(self.store.expire, self.config.result_ttl_s)
                if n:
                    log.info("expired results", extra={"count": n})
            except Exception:
                log.exception("expiry failed")

    # -- stop ------------------------------------------------------------------------------------------------
    async def stop_claiming(self) -> None:
        """Draining: claim nothing more; a claim under way lands first."""
        self.draining = True
        async with self._claiming:
            pass

    async def hand_back(self, unstarted: list[WorkItem]) -> None:
        """Hand the unstarted claims back now, not when their leases run out, so that another replica (or the next
        start) runs them; they are still IN_QUEUE in the store."""
        for item in unstarted:
            self.outputs.untrack(item)
        await asyncio.to_thread(self.store.release, self.config.name, [item.id for item in unstarted])

    async def release_all(self) -> None:
        """What the grace period stopped goes back too."""
        await asyncio.to_thread(self.store.release, self.config.name)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
