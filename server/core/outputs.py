"""The output side: everything a request's life leaves behind, done on the event loop, never on the engine's thread.

The engine loop reports plain events (`engine_loop.Event`) from its threads; `report` hops them onto the event loop,
where, in the order they happened, this module

- keeps the live requests of this replica (`live`: from acceptance until their outcome is recorded) and what they
  did (progress, log lines);
- tells the callers that wait on a request (`watch`) about its queue position, steps and log lines, then its end;
- writes the store: a durable request's start (`set_running`), and every outcome that must be kept (`finish`:
  result, images, error, logs), in worker threads, so neither the event loop nor the engine waits on a disk; an
  outcome that meets the store away is kept and written once it is back (retried with backoff), so that work
  finished during a database outage is recorded, not run again;
- moves the metrics, and hands ended requests with a webhook to the webhook deliveries.

An outcome is recorded before anyone waiting is told, so whoever sees the terminal state can read the stored result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from engine.request import Cancelled, GenerationResult
from server.observability.metrics import STAGES, Metrics
from server.storage import ResultWriteFailed, Store, StoreUnavailable
from server.storage.states import State

from . import records
from .engine_loop import Batched, Event, ItemEvent, Queue, Started
from .work import (
    Done,
    Logged,
    Previewed,
    Queued,
    ShutdownAbort,
    Stepped,
    Update,
    WorkItem,
    final_state,
    log_line,
)

log = logging.getLogger("pixart.server")
RECORD_RETRY_S = (0.5, 10.0)  # first and longest wait between attempts to record an outcome while the store is away


def tenant_label(item: WorkItem) -> str:
    return item.tenant or "anonymous"


class Webhooks(Protocol):
    def schedule(self, request_id: str) -> None: ...


class Outputs:
    def __init__(self, store: Store, *, replica: str, metrics: Metrics, webhooks: Webhooks):
        self.store, self.replica, self.metrics, self.webhooks = store, replica, metrics, webhooks
        self.live: dict[str, WorkItem] = {}  # accepted here, outcome not yet recorded
        self.on_lost_claim: Callable[[WorkItem], None] = lambda item: None  # stops an item (set by the app)
        self._watchers: dict[str, list[asyncio.Queue[Update]]] = {}
        self._changed: dict[str, asyncio.Event] = {}  # request id -> set at its next update (status streams)
        self._positions: dict[str, int] = {}
        self._marking: dict[str, asyncio.Task] = {}  # a durable request's start, being written
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- the live requests and who waits on them -------------------------------------------------------------
    def track(self, item: WorkItem) -> None:
        self.live[item.id] = item

    def watch(self, item: WorkItem) -> asyncio.Queue[Update]:
        """The updates of a tracked item, for a caller that waits on it; the last one is Done."""
        updates: asyncio.Queue[Update] = asyncio.Queue()
        self._watchers.setdefault(item.id, []).append(updates)
        return updates

    def untrack(self, item: WorkItem) -> None:
        """Forget an item this replica will not run: refused by the queue, or handed back to the store."""
        self.live.pop(item.id, None)
        self._watchers.pop(item.id, None)

    def durable(self) -> list[WorkItem]:
        return [item for item in self.live.values() if item.durable]

    def add_log(self, item: WorkItem, message: str, level: str = "INFO") -> None:
        line = log_line(message, level)
        item.logs.append(line)
        self._publish(item, Logged(line))

    # -- events from the engine loop -------------------------------------------------------------------------
    def report(self, event: Event) -> None:
        """From any thread: act on the event on the event loop, in the order reported."""
        self._loop.call_soon_threadsafe(self._handle, event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, ItemEvent):
            item, update = event.item, event.update
            if isinstance(update, Done):
                self.spawn(self.complete(item, update.outcome))
                return
            if isinstance(update, Stepped):
                item.progress = (update.step, update.total)
            elif isinstance(update, Previewed):
                item.preview = update
            elif isinstance(update, Logged):
                item.logs.append(update.line)
            self._publish(item, update)
        elif isinstance(event, Queue):
            self._queue_changed(event.waiting)
        elif isinstance(event, Batched):
            self.metrics.batch_size.observe(event.rows)
        elif isinstance(event, Started):
            self._started(event.items)

    def _queue_changed(self, waiting: tuple[WorkItem, ...]) -> None:
        self.metrics.queue_depth.set(len(waiting))
        positions = {item.id: n for n, item in enumerate(waiting)}
        for n, item in enumerate(waiting):
            if self._positions.get(item.id) != n:
                self._publish(item, Queued(n))
        self._positions = positions

    def _started(self, items: tuple[WorkItem, ...]) -> None:
        for item in items:
            self.metrics.queue_seconds.observe(item.queue_s)
            self.metrics.tenant_queue_seconds.labels(tenant_label(item)).observe(item.queue_s)
            self.add_log(item, "started")
            if item.durable:
                self._marking[item.id] = self.spawn(self._mark_running(item))

    async def _mark_running(self, item: WorkItem) -> None:
        try:
            held = await asyncio.to_thread(self.store.set_running, item.id, self.replica, item.claim)
        except StoreUnavailable:  # the database is away: the renewal will tell whether the claim still holds
            log.warning("recording the start failed: the store is away", extra={"request_id": item.id})
            return
        except Exception:
            log.exception("recording the start failed", extra={"request_id": item.id})
            return
        if not held:
            log.warning("lost the claim before it started; stopping", extra={"request_id": item.id})
            self.on_lost_claim(item)

    # -- outcomes --------------------------------------------------------------------------------------------
    async def complete(self, item: WorkItem, outcome: GenerationResult | BaseException) -> None:
        """Give an item its outcome: recorded first, then the ones waiting are told, then its webhook goes."""
        marking = self._marking.pop(item.id, None)
        if marking is not None:
            await marking  # its start is in the store before its end
        state = final_state(outcome)
        if isinstance(outcome, ShutdownAbort) and item.durable:
            # left IN_PROGRESS in the store and handed back by the drain: it runs again, here or elsewhere
            self._end(item, outcome)
            return
        if isinstance(outcome, GenerationResult):
            self.add_log(item, "completed")
        elif state == State.CANCELED:
            self.add_log(item, "canceled")
        else:
            self.add_log(item, f"failed: {type(outcome).__name__}: {str(outcome)[:500]}", "ERROR")
        recorded, outcome = await self._recorded(item, state, outcome)
        if recorded is not None and recorded != state:
            state = recorded
            if state == State.CANCELED:  # a cancel acknowledged before the record wins
                outcome = Cancelled("cancelled before its result was recorded")
                self.add_log(item, "canceled: the cancel arrived before the result was recorded")
        self._count(state, outcome)
        self.metrics.tenant_outcomes.labels(tenant_label(item), state).inc()
        if isinstance(outcome, GenerationResult):
            self.metrics.tenant_images.labels(tenant_label(item)).inc(len(outcome.images))
        item.state = state
        self._end(item, outcome)
        if recorded is not None:
            steps = {"steps_computed": outcome.steps_computed, "steps_cached": outcome.steps_cached} if isinstance(
                outcome, GenerationResult) else {}
            log.info("ended", extra={"request_id": item.id, "state": state, "queue_s": round(item.queue_s, 4),
                                     **steps})
            if item.webhook_url:
                self.webhooks.schedule(item.id)

    async def _recorded(self, item: WorkItem, state: str, outcome: GenerationResult | BaseException
                        ) -> tuple[str | None, GenerationResult | BaseException]:
        """Record the outcome, waiting out a store that cannot be reached (the request stays live here meanwhile,
        and its claim fences a late write); images that cannot be stored make the outcome that failure. Returns
        the state recorded (None when it could not be) and the outcome."""
        wait, longest = RECORD_RETRY_S
        while True:
            try:
                recorded = await asyncio.to_thread(self._record, item, state, outcome)
            except ResultWriteFailed as exc:  # the images are gone: the request fails, saying why
                self.metrics.result_write_failures.inc()
                log.error("storing the result images failed", extra={"request_id": item.id, "error": str(exc)})
                state, outcome = State.FAILED, exc
                self.add_log(item, f"failed: {exc}", "ERROR")
                continue
            except StoreUnavailable:
                if wait == RECORD_RETRY_S[0]:
                    log.warning("the store is away; the outcome is kept and recorded once it is back",
                                extra={"request_id": item.id, "state": state})
                await asyncio.sleep(wait)
                wait = min(2 * wait, longest)
                continue
            except Exception:
                log.exception("recording the outcome failed", extra={"request_id": item.id})
                return None, outcome
            if recorded is None:  # another replica took the request over (or it ended): its outcome is the one kept
                log.warning("outcome refused: the claim was lost", extra={"request_id": item.id, "state": state})
            return recorded, outcome

    def _record(self, item: WorkItem, state: str, outcome: GenerationResult | BaseException) -> str | None:
        """The store write of an outcome (in a worker thread): durable requests always, a call's only when its
        images must outlive it (sync_mode=false: they are served by URL). The state recorded (CANCELED where a
        cancel was acknowledged first), None when the claim was lost."""
        result = error = None
        images: list[tuple[str, bytes]] = []
        if isinstance(outcome, GenerationResult):
            result = records.result_to_proto(outcome, item.id, queue_s=item.queue_s, include_data=False)
            if item.durable or not item.request.sync_mode:
                images = [(img.file_name, img.data) for img in outcome.images]
        else:
            error = records.outcome_status(outcome)
        if not (item.durable or images):
            return state
        request = item.request_bytes or records.request_to_proto(item.request).SerializeToString()
        return self.store.finish(
            item.id, state, request=request, owner=self.replica if item.durable else None, attempt=item.claim,
            result=result.SerializeToString() if result is not None else None, images=images,
            error=error.SerializeToString() if error is not None else None, logs=item.logs, tenant=item.tenant)

    def _count(self, state: str, outcome: GenerationResult | BaseException) -> None:
        self.metrics.outcomes.labels(state).inc()
        if isinstance(outcome, GenerationResult):
            self.metrics.images.inc(len(outcome.images))
            self.metrics.row_steps.labels("computed").inc(outcome.steps_computed)
            self.metrics.row_steps.labels("cached").inc(outcome.steps_cached)
            for stage in STAGES:
                if stage in outcome.timings:
                    self.metrics.stage_seconds.labels(stage).observe(outcome.timings[stage])

    def _end(self, item: WorkItem, outcome: GenerationResult | BaseException) -> None:
        item.outcome = outcome
        self.live.pop(item.id, None)
        self._positions.pop(item.id, None)
        self._publish(item, Done(outcome))
        self._watchers.pop(item.id, None)

    def _publish(self, item: WorkItem, update: Update) -> None:
        for updates in self._watchers.get(item.id, ()):
            updates.put_nowait(update)
        changed = self._changed.pop(item.id, None)
        if changed is not None:
            changed.set()

    async def changed(self, request_id: str, timeout: float) -> bool:
        """Wait until a request live here changes (a position, a step, a log line, its end), at most `timeout`;
        False at once for a request not live here (it is the store's to tell)."""
        if request_id not in self.live:
            return False
        event = self._changed.setdefault(request_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        return True

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait (a while) for the outcomes being recorded: at stop, so that none is lost half-way."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
