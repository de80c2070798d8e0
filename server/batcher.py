"""Iteration-level batching: requests join and leave running batches at denoising-step boundaries.

One worker thread owns the engine (it is synchronous and CPU/GPU-bound). Each iteration it

  1. applies cancels, deadlines and a shutdown abort: those rows leave their group, the others go on;
  2. admits waiting requests, oldest first, into the running group of their latent size (one group per size
     bin), while the group has room (`max_batch` requests, `max_batch_images` images) and the memory budget
     (`max_running_images` across groups) allows; `engine.prepare` encodes their text there;
  3. runs one step for the group whose turn it is (groups take turns, so no size bin waits on another);
  4. hands the rows of that group that are done to the finisher thread (decode, safety, encode, report), so the
     others' next step does not wait for a decode.

So a request that arrives while a batch runs starts at the next step instead of after the whole batch, and a
4-step request leaves after 4 steps however long its companions run (Orca/vLLM's iteration-level scheduling).
`continuous=False` gives request-level batching instead: a batch forms only while nothing runs (waiting up to
`max_wait_s` for companions) and runs until its last row is done.

The event loop never waits on the worker: it submits, cancels and reads positions under a short lock, and
hears about progress through listeners the worker calls (the service's hop back with call_soon_threadsafe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.request import Cancelled, GenerationRequest, GenerationResult

from .states import State
from .store import new_request_id

log = logging.getLogger("pixart.server.batcher")


class Engine(Protocol):
    """What the server needs from an engine (engine.Engine is one)."""

    has_safety_checker: bool

    def violations(self, request: GenerationRequest) -> list[tuple[str, str]]: ...

    def binned_size(self, request: GenerationRequest) -> tuple[int, int]: ...

    def prepare(self, request: GenerationRequest) -> Any: ...

    def step(self, generations: Sequence[Any]) -> None: ...

    def finish(self, generations: Sequence[Any]) -> list[GenerationResult]: ...

    def warmup(self) -> None: ...


class QueueFull(Exception):
    """More requests than max_queue are waiting."""


class Draining(Exception):
    """The server is shutting down and takes no new work."""


class ShutdownAbort(Exception):
    """Running work was stopped because the shutdown grace period ran out."""


class DeadlineExceeded(Cancelled):
    """The caller's deadline passed before the work ended."""


@dataclass(eq=False)
class WorkItem:
    """One request as the server tracks it, from acceptance to its outcome."""

    request: GenerationRequest
    durable: bool = False
    request_bytes: bytes = b""  # the original proto, kept for the store
    webhook_url: str = ""
    claim: int = 0  # durable: the attempt number of this replica's claim on it (the store's fencing token)
    deadline: float | None = None  # time.monotonic() after which the work stops
    id: str = field(default_factory=new_request_id)
    group: Hashable = None  # requests of one group (size bin) can share a step
    state: State = State.IN_QUEUE
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancel_requested: bool = False
    progress: tuple[int, int] = (0, 0)
    logs: list[dict] = field(default_factory=list)
    outcome: GenerationResult | BaseException | None = None
    generation: Any = None  # the engine's state while it runs
    # called with (item, event) from any thread; events: ("queued", pos) ("progress", step, total) ("log", line)
    # ("done",)
    listeners: list[Callable[[WorkItem, tuple], None]] = field(default_factory=list)
    last_position: int | None = None

    @property
    def images(self) -> int:
        return int(self.request.num_images)

    @property
    def queue_s(self) -> float:
        return (self.started if self.started is not None else time.monotonic()) - self.enqueued

    def emit(self, event: tuple) -> None:
        for listener in list(self.listeners):
            try:
                listener(self, event)
            except Exception:  # a broken listener must not take the worker down
                log.exception("listener failed", extra={"request_id": self.id})

    def add_log(self, message: str, level: str = "INFO") -> None:
        line = {"message": message, "level": level, "timestamp": time.time()}
        self.logs.append(line)
        self.emit(("log", line))

    def should_stop(self) -> BaseException | None:
        if self.cancel_requested:
            return Cancelled()
        if self.deadline is not None and time.monotonic() > self.deadline:
            return DeadlineExceeded()
        return None


class _ItemLogHandler(logging.Handler):
    """Engine log records emitted by the worker become log lines of the requests it is working on."""

    def __init__(self, batcher: Batcher):
        super().__init__(logging.INFO)
        self.batcher = batcher

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() != self.batcher.worker_ident:
            return
        for item in self.batcher.current:
            item.add_log(record.getMessage(), record.levelname)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = 64,
        max_batch: int = 4,
        max_batch_images: int = 4,
        max_running_images: int | None = None,
        max_wait_s: float = 0.01,
        continuous: bool = True,
        on_start: Callable[[list[WorkItem]], None] | None = None,
        on_finish: Callable[[WorkItem, State], None] | None = None,
        metrics: Any = None,
    ):
        self.engine = engine
        self.max_queue, self.max_batch, self.max_batch_images = max_queue, max_batch, max_batch_images
        self.max_running_images = max_running_images or max_batch_images
        self.max_wait_s, self.continuous = max_wait_s, continuous
        self.on_start, self.on_finish, self.metrics = on_start, on_finish, metrics
        self.pending: list[WorkItem] = []
        self.groups: dict[Hashable, list[WorkItem]] = {}  # running, by group key, in the order they started
        self.items: dict[str, WorkItem] = {}  # queued and running, by id
        self.current: list[WorkItem] = []  # what the worker is working on right now (for log lines)
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._abort = False
        self._preparing: list[WorkItem] = []
        self._finishing: list[WorkItem] = []  # done stepping, being decoded on the finisher thread
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixart-finish")
        self._last_group: Hashable = None
        self._thread: threading.Thread | None = None
        self.worker_ident: int | None = None
        self._log_handler = _ItemLogHandler(self)

    @property
    def running(self) -> list[WorkItem]:
        return ([item for group in list(self.groups.values()) for item in group] + list(self._preparing)
                + list(self._finishing))

    # -- called from the event loop -------------------------------------------------------------------------
    def start(self) -> None:
        logging.getLogger("engine").addHandler(self._log_handler)
        self._thread = threading.Thread(target=self._run, name="pixart-engine", daemon=True)
        self._thread.start()

    def submit(self, item: WorkItem, *, force: bool = False) -> int:
        """Queue an item and return its position (0 = next). force: past max_queue (recovered durable ones)."""
        item.group = self.engine.binned_size(item.request)
        with self._cond:
            if not self._accepting and not force:
                raise Draining()
            if len(self.pending) >= self.max_queue and not force:
                raise QueueFull()
            self.pending.append(item)
            self.items[item.id] = item
            position = len(self.pending) - 1
            item.last_position = position
            self._cond.notify_all()
        self._depth_changed()
        return position

    def position(self, item: WorkItem) -> int | None:
        with self._cond:
            try:
                return self.pending.index(item)
            except ValueError:
                return None

    def cancel(self, item_id: str) -> str | None:
        """'queued' (removed, will not run), 'running' (leaves at the next step), or None (not live)."""
        with self._cond:
            item = self.items.get(item_id)
            if item is None:
                return None
            if item in self.pending:
                self.pending.remove(item)
                del self.items[item_id]
                queued = True
            else:
                item.cancel_requested = True
                queued = False
        if queued:
            self.complete(item, Cancelled())
            self._positions_changed()
            return "queued"
        return "running"

    def stop_accepting(self) -> list[WorkItem]:
        """Refuse new work and take the queued items out (returned, for the caller to settle)."""
        with self._cond:
            self._accepting = False
            taken, self.pending = self.pending, []
            for item in taken:
                self.items.pop(item.id, None)
            self._cond.notify_all()
        self._depth_changed()
        return taken

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs; True if that happened within timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while self.groups or self._preparing or self._finishing:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def abort_running(self) -> None:
        """Make every running request stop at its next step (shutdown grace exhausted)."""
        self._abort = True
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._finisher.shutdown(wait=True)
        logging.getLogger("engine").removeHandler(self._log_handler)

    # -- the worker thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        self.worker_ident = threading.get_ident()
        while True:
            with self._cond:
                while not self.groups and not self._startable():
                    if self._stopping:
                        return
                    self._cond.wait(self._idle_wait())
            try:
                self._iteration()
            except Exception:  # never leave a caller waiting: whatever was running gets this outcome
                log.exception("iteration failed")
                self._fail_running(RuntimeError("the engine worker failed; see the server log"))

    def _iteration(self) -> None:
        self._drop_stopped()
        self._admit()
        group = self._next_group()
        if group is None:  # nothing to step: the budget is held by rows being decoded; wait for one to settle
            with self._cond:
                self._cond.wait(0.05)
            return
        items = list(self.groups[group])
        self.current = items
        if self.metrics:
            self.metrics.batch_size.observe(len(items))
        try:
            self.engine.step([item.generation for item in items])
        except Exception as exc:  # the engine's failure is this group's outcome, not the worker's
            log.exception("step failed", extra={"request_id": ",".join(i.id for i in items)})
            self._leave(group, items, exc)
            return
        finally:
            self.current = []
        finished = []
        for item in items:
            g = item.generation
            item.progress = (g.step_index, g.total_steps)
            item.emit(("progress", g.step_index, g.total_steps))
            if g.done:
                finished.append(item)
        if finished:
            self._finish(group, finished)

    def _startable(self) -> bool:
        """Whether an admission could happen now (called under the lock)."""
        if not self.pending:
            return False
        if self.continuous or self.groups:
            return True
        head = self.pending[0]
        batch = self._companions(head)
        return len(batch) >= self.max_batch or time.monotonic() >= head.enqueued + self.max_wait_s or self._stopping

    def _idle_wait(self) -> float | None:
        if self.pending and not self.continuous:
            return max(0.001, self.pending[0].enqueued + self.max_wait_s - time.monotonic())
        return None

    def _companions(self, head: WorkItem) -> list[WorkItem]:
        batch, images = [head], head.images
        for item in self.pending[1:]:
            if len(batch) >= self.max_batch:
                break
            if item.group == head.group and images + item.images <= self.max_batch_images:
                batch.append(item)
                images += item.images
        return batch

    def _admit(self) -> None:
        with self._cond:
            if self.continuous:
                chosen = []
                in_flight = sum(i.images for i in self.running)
                sizes = {key: (len(items), sum(i.images for i in items)) for key, items in self.groups.items()}
                for item in self.pending:
                    count, images = sizes.get(item.group, (0, 0))
                    if in_flight + item.images > self.max_running_images and in_flight:
                        break  # the memory budget is spent: nobody overtakes the oldest waiting request
                    if (count >= self.max_batch or images + item.images > self.max_batch_images) and count:
                        continue  # its group is full; requests of other sizes may go ahead
                    chosen.append(item)
                    sizes[item.group] = (count + 1, images + item.images)
                    in_flight += item.images
            elif not self.groups and self._startable():
                chosen = self._companions(self.pending[0])
            else:
                chosen = []
            for item in chosen:
                self.pending.remove(item)
                item.state = State.IN_PROGRESS
                item.started = time.monotonic()
            self._preparing = list(chosen)
        if not chosen:
            return
        self._depth_changed()
        self._positions_changed()
        if self.on_start:
            self.on_start(chosen)
        for item in chosen:
            if self.metrics:
                self.metrics.queue_seconds.observe(item.started - item.enqueued)
            stop = item.should_stop()
            if stop is not None:  # its deadline passed while it waited
                self._settle(item, stop)
                continue
            item.add_log("started")
            self.current = [item]
            try:
                item.generation = self.engine.prepare(item.request)
            except Exception as exc:
                self._settle(item, exc)
                continue
            finally:
                self.current = []
            with self._cond:
                self.groups.setdefault(item.group, []).append(item)
                self._preparing.remove(item)
        log.info("admitted", extra={"request_id": ",".join(i.id for i in chosen), "count": len(chosen)})

    def _next_group(self) -> Hashable:
        """Groups take turns, in the order they started: the one after the group stepped last."""
        keys = list(self.groups)
        if not keys:
            return None
        if self._last_group in keys:
            key = keys[(keys.index(self._last_group) + 1) % len(keys)]
        else:
            key = keys[0]
        self._last_group = key
        return key

    def _drop_stopped(self) -> None:
        for key, items in list(self.groups.items()):
            leaving = [(i, ShutdownAbort() if self._abort else i.should_stop()) for i in items]
            leaving = [(i, why) for i, why in leaving if why is not None]
            for item, why in leaving:
                self._leave(key, [item], why)

    def _leave(self, key: Hashable, items: list[WorkItem], outcome: BaseException) -> None:
        items = list(items)
        with self._cond:
            group = self.groups.get(key, [])
            for item in items:
                if item in group:
                    group.remove(item)
            if not group:
                self.groups.pop(key, None)
        for item in items:
            self._settle(item, outcome)

    def _finish(self, key: Hashable, items: list[WorkItem]) -> None:
        """Rows that are done leave their group now; decoding and encoding them happens on the finisher thread,
        so the steps of everyone else do not wait for a VAE decode."""
        with self._cond:
            group = self.groups.get(key, [])
            for item in items:
                group.remove(item)
            if not group:
                self.groups.pop(key, None)
            self._finishing.extend(items)
        self._finisher.submit(self._finish_now, items)

    def _finish_now(self, items: list[WorkItem]) -> None:
        for item in items:  # one at a time: a failure to decode one request is that request's alone
            try:
                (outcome,) = self.engine.finish([item.generation])
            except Exception as exc:
                log.exception("finishing failed", extra={"request_id": item.id})
                outcome = exc
            self._settle(item, outcome)

    def _fail_running(self, exc: BaseException) -> None:
        for key, items in list(self.groups.items()):
            self._leave(key, list(items), exc)
        for item in list(self._preparing):
            self._settle(item, exc)

    def _settle(self, item: WorkItem, outcome: GenerationResult | BaseException) -> None:
        item.generation = None  # its latents and text states are not needed any more
        self.complete(item, outcome)
        with self._cond:
            for busy in (self._preparing, self._finishing):
                if item in busy:
                    busy.remove(item)
            self._cond.notify_all()

    # -- outcomes and notifications -------------------------------------------------------------------------
    def complete(self, item: WorkItem, outcome: GenerationResult | BaseException) -> None:
        """Give an item its outcome: recorded (on_finish) before anyone waiting is told."""
        item.outcome = outcome
        if isinstance(outcome, GenerationResult):
            state = State.COMPLETED
            item.add_log("completed")
        elif isinstance(outcome, Cancelled) and not isinstance(outcome, DeadlineExceeded):
            state = State.CANCELED
            item.add_log("canceled")
        else:
            state = State.FAILED
            item.add_log(f"failed: {type(outcome).__name__}: {str(outcome)[:500]}", "ERROR")
        if self.on_finish:
            try:
                # persisted first: whoever sees the terminal state can then read the stored result
                self.on_finish(item, state)
            except Exception:
                log.exception("recording the outcome failed", extra={"request_id": item.id})
        item.state = state
        with self._cond:
            self.items.pop(item.id, None)
        item.emit(("done",))

    def _depth_changed(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self.pending))

    def _positions_changed(self) -> None:
        with self._cond:
            snapshot = list(enumerate(self.pending))
        for position, item in snapshot:
            if item.last_position != position:
                item.last_position = position
                item.emit(("queued", position))
