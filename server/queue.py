"""In-memory scheduling: a bounded FIFO of jobs, a dynamic batcher and the one worker thread that runs the engine.

The engine is synchronous and CPU-bound, so exactly one thread calls it. The event loop never waits on that
thread: it enqueues, cancels and reads positions under a short lock, and hears about progress through
listeners that the worker calls (the service's listeners hop back onto the loop with call_soon_threadsafe).

Batching: the worker takes the oldest job and every other queued job with the same engine.batch_key, up to
max_batch requests / max_batch_images images. If the batch is not full it waits for companions, but only until
the oldest job has waited max_wait_s in all, so an idle server adds at most max_wait_s of latency and a busy
one adds none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.request import Cancelled, GenerationRequest, GenerationResult

from . import store as st

log = logging.getLogger("pixart.server.queue")


class QueueFull(Exception):
    """More jobs than max_queue are waiting."""


class Draining(Exception):
    """The server is shutting down and takes no new work."""


class ShutdownAbort(Exception):
    """Running work was stopped because the shutdown grace period ran out."""


class DeadlineExceeded(Cancelled):
    """The caller's deadline passed before the work ended."""


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    durable: bool = False
    request_bytes: bytes = b""  # the original proto, kept for the store
    webhook_url: str = ""
    deadline: float | None = None  # time.monotonic() after which the work stops
    id: str = field(default_factory=st.new_request_id)
    key: tuple = ()
    state: str = st.IN_QUEUE
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    progress: tuple[int, int] = (0, 0)
    logs: list[dict] = field(default_factory=list)
    outcome: GenerationResult | BaseException | None = None
    # called with (job, event) from any thread; events: ("queued", pos) ("progress", step, total) ("log", line)
    # ("done",)
    listeners: list[Callable[[Job, tuple], None]] = field(default_factory=list)
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


class _BatchLogHandler(logging.Handler):
    """Engine log records emitted on the worker thread become log lines of the jobs in the running batch."""

    def __init__(self, scheduler: Scheduler):
        super().__init__(logging.INFO)
        self.scheduler = scheduler

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() != self.scheduler.worker_ident:
            return
        for job in self.scheduler.running:
            job.add_log(record.getMessage(), record.levelname)


class Scheduler:
    def __init__(
        self,
        engine: Any,
        *,
        max_queue: int = 64,
        max_batch: int = 4,
        max_batch_images: int = 4,
        max_wait_s: float = 0.01,
        on_start: Callable[[list[Job]], None] | None = None,
        on_finish: Callable[[Job, str], None] | None = None,
        metrics: Any = None,
    ):
        self.engine = engine
        self.max_queue, self.max_batch, self.max_batch_images = max_queue, max_batch, max_batch_images
        self.max_wait_s = max_wait_s
        self.on_start, self.on_finish, self.metrics = on_start, on_finish, metrics
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self.jobs: dict[str, Job] = {}  # queued and running, by id
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self.worker_ident: int | None = None
        self._log_handler = _BatchLogHandler(self)

    # -- called from the event loop -------------------------------------------------------------------------
    def start(self) -> None:
        engine_log = logging.getLogger("engine")
        engine_log.addHandler(self._log_handler)
        if engine_log.level == logging.NOTSET:  # so that INFO lines such as prompt truncation reach the caller
            engine_log.setLevel(logging.INFO)
        self._thread = threading.Thread(target=self._run, name="pixart-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job, *, force: bool = False) -> int:
        """Queue a job and return its position (0 = next). force: past max_queue (recovered durable jobs)."""
        if not job.key:  # the service computes it off the event loop; recovery does it here, in its thread
            job.key = self.engine.batch_key(job.request)
        with self._cond:
            if not self._accepting and not force:
                raise Draining()
            if len(self.pending) >= self.max_queue and not force:
                raise QueueFull()
            self.pending.append(job)
            self.jobs[job.id] = job
            position = len(self.pending) - 1
            job.last_position = position
            self._cond.notify_all()
        self._depth_changed()
        return position

    def position(self, job: Job) -> int | None:
        with self._cond:
            try:
                return self.pending.index(job)
            except ValueError:
                return None

    def cancel(self, job_id: str) -> str | None:
        """'queued' (removed, will not run), 'running' (stops at the next step), or None (not live)."""
        with self._cond:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job in self.pending:
                self.pending.remove(job)
                del self.jobs[job_id]
                queued = True
            else:
                job.cancel_requested = True
                queued = False
        if queued:
            self._complete(job, Cancelled())
            self._positions_changed()
            return "queued"
        return "running"

    def stop_accepting(self) -> list[Job]:
        """Refuse new work and take the queued jobs out (returned, for the caller to settle)."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            taken, self.pending = self.pending, []
            for job in taken:
                self.jobs.pop(job.id, None)
            self._cond.notify_all()
        self._depth_changed()
        return taken

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the running batch to end; True if it did within timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while self.running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def abort_running(self) -> None:
        """Make the running batch stop at its next step (shutdown grace exhausted)."""
        self._abort = True

    def join(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        logging.getLogger("engine").removeHandler(self._log_handler)

    # -- the worker thread ----------------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self.pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                head = self.pending[0]
                batch = self._companions(head)
                wait = head.enqueued + self.max_wait_s - time.monotonic()
                if self._full(batch) or wait <= 0:
                    break
                self._cond.wait(wait)
                if self.pending and self.pending[0] is head:  # otherwise start over with the new head
                    batch = self._companions(head)
                    if self._full(batch) or head.enqueued + self.max_wait_s <= time.monotonic():
                        break
            for job in batch:
                self.pending.remove(job)
                job.state = st.IN_PROGRESS
                job.started = time.monotonic()
            self.running = batch
        return batch

    def _companions(self, head: Job) -> list[Job]:
        batch, images = [head], head.images
        for job in self.pending[1:]:
            if len(batch) >= self.max_batch:
                break
            if job.key == head.key and images + job.images <= self.max_batch_images:
                batch.append(job)
                images += job.images
        return batch

    def _full(self, batch: list[Job]) -> bool:
        return len(batch) >= self.max_batch or sum(j.images for j in batch) >= self.max_batch_images

    def _run(self) -> None:
        self.worker_ident = threading.get_ident()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._depth_changed()
            self._positions_changed()
            try:
                self._run_batch(batch)
            except BaseException as exc:  # never leave a caller waiting: every job in the batch gets an outcome
                log.exception("batch failed")
                for job in batch:
                    if job.outcome is None:
                        self._complete(job, exc)
            finally:
                with self._cond:
                    self.running = []
                    self._cond.notify_all()

    def _run_batch(self, batch: list[Job]) -> None:
        live = []
        for job in batch:  # a job whose deadline passed while it waited does not run
            stop = job.should_stop()
            if stop is not None:
                self._complete(job, stop)
            else:
                live.append(job)
        if not live:
            return
        if self.on_start:
            self.on_start(live)
        if self.metrics:
            self.metrics.batch_size.observe(len(live))
            for job in live:
                self.metrics.queue_seconds.observe(job.started - job.enqueued)
        ids = ",".join(j.id for j in live)
        log.info("batch started", extra={"request_id": ids, "batch_size": len(live)})
        for job in live:
            job.add_log(f"started (batch of {len(live)})")

        def on_step(step: int, total: int) -> None:
            for job in live:
                if job.outcome is None:
                    job.progress = (step, total)
                    job.emit(("progress", step, total))

        def stop_reason(job: Job) -> BaseException | None:
            return ShutdownAbort() if self._abort else job.should_stop()

        if len(live) == 1:
            job = live[0]
            try:
                out: GenerationResult | BaseException = self.engine.generate(
                    job.request, on_step=on_step, should_cancel=lambda: stop_reason(job) is not None
                )
            except BaseException as exc:  # the engine's failure is this job's outcome, not the worker's
                out = exc
            outcomes = [out]
        else:
            outcomes = self.engine.generate_batch(
                [j.request for j in live], on_step=on_step, should_cancel=lambda i: stop_reason(live[i]) is not None
            )
        for job, out in zip(live, outcomes, strict=True):
            if isinstance(out, Cancelled):
                out = stop_reason(job) or out  # say why: deadline, shutdown, or the caller's cancel
            self._complete(job, out)

    # -- outcomes and notifications -------------------------------------------------------------------------
    def _complete(self, job: Job, outcome: GenerationResult | BaseException) -> None:
        job.outcome = outcome
        job.finished = time.monotonic()
        if isinstance(outcome, GenerationResult):
            state = st.COMPLETED
            job.add_log("completed")
        elif isinstance(outcome, Cancelled) and not isinstance(outcome, DeadlineExceeded):
            state = st.CANCELED
            job.add_log("canceled")
        else:
            state = st.FAILED
            job.add_log(f"failed: {type(outcome).__name__}: {outcome}", "ERROR")
        if self.on_finish:
            try:
                # persisted first: whoever sees the terminal state can then read the stored result
                self.on_finish(job, state)
            except Exception:
                log.exception("recording the outcome failed", extra={"request_id": job.id})
        job.state = state
        with self._cond:
            self.jobs.pop(job.id, None)
        job.emit(("done",))

    def _depth_changed(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self.pending))

    def _positions_changed(self) -> None:
        with self._cond:
            snapshot = list(enumerate(self.pending))
        for position, job in snapshot:
            if job.last_position != position:
                job.last_position = position
                job.emit(("queued", position))
