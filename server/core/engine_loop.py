"""The engine loop: one thread owns the engine and does what the scheduler decided, step after step.

    plan = scheduler.schedule(now)            # who leaves, who starts, which group steps
    output = self.execute(plan)               # engine.prepare the new rows, engine.step the group
    done = scheduler.update_from_output(output)
    finisher: engine.finish(done rows)        # decode, safety, encode: off this thread, so the others step on

Everything that happens is reported as a plain event (`Started`, `Batched`, `Queue`, and `ItemEvent`: a request's
step, log line or outcome) to the output side, which records and publishes it on the event loop: this thread never
touches the store, a socket or a caller. The event loop reaches the scheduler only through the short, lock-guarded
methods below (submit, cancel, position...), so it never waits on the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from engine.request import Cancelled, GenerationRequest, GenerationResult

from .scheduler import ExecutionOutput, Scheduler, SchedulerOutput
from .work import Done, Logged, Previewed, Stepped, Update, WorkItem, log_line

log = logging.getLogger("pixart.server.engine_loop")


class Engine(Protocol):
    """What the server needs from an engine (engine.Engine is one)."""

    has_safety_checker: bool

    def violations(self, request: GenerationRequest) -> list[tuple[str, str]]: ...

    def binned_size(self, request: GenerationRequest) -> tuple[int, int]: ...

    def prepare(self, request: GenerationRequest) -> Any: ...

    def step(self, generations: Sequence[Any]) -> None: ...

    def finish(self, generations: Sequence[Any]) -> list[GenerationResult]: ...

    def preview(self, generation: Any) -> bytes | None: ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...


# -- what the loop reports (plain data; the output side acts on it) ---------------------------------------------
@dataclass(frozen=True)
class Started:
    items: tuple[WorkItem, ...]


@dataclass(frozen=True)
class Batched:
    rows: int  # requests stepped together by one engine.step


@dataclass(frozen=True)
class Queue:
    """The waiting requests, in order, after the queue changed."""

    waiting: tuple[WorkItem, ...]


@dataclass(frozen=True)
class ItemEvent:
    """What happened to one request: a step (Stepped), a log line (Logged) or its outcome (Done)."""

    item: WorkItem
    update: Update


Event = Started | Batched | Queue | ItemEvent


class _ItemLogHandler(logging.Handler):
    """Engine log records emitted by the loop's thread become log lines of the requests it is working on."""

    def __init__(self, loop: EngineLoop):
        super().__init__(logging.INFO)
        self.loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() != self.loop.thread_ident:
            return
        for item in self.loop.current:
            self.loop.report(ItemEvent(item, Logged(log_line(record.getMessage(), record.levelname))))


class EngineLoop:
    def __init__(self, engine: Engine, scheduler: Scheduler, report: Callable[[Event], None]):
        self.engine, self.scheduler, self.report = engine, scheduler, report
        self.current: list[WorkItem] = []  # what the engine works on right now (for its log lines)
        self.thread_ident: int | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixart-finish")
        self._log_handler = _ItemLogHandler(self)

    # -- initialize / finalize -------------------------------------------------------------------------------
    def start(self) -> None:
        logging.getLogger("engine").addHandler(self._log_handler)
        self._thread = threading.Thread(target=self._run, name="pixart-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Let the loop end (after what runs), wait for it and the finisher, and release the engine."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._finisher.shutdown(wait=True)
        logging.getLogger("engine").removeHandler(self._log_handler)
        if self._thread is None or not self._thread.is_alive():  # never pull the engine from under a step
            self.engine.close()

    # -- called from the event loop (short, under the lock) --------------------------------------------------
    def submit(self, item: WorkItem, *, force: bool = False) -> int:
        """Queue an item; its position (0 = next). Raises QueueFull or Draining (not with `force`)."""
        item.group = self.engine.binned_size(item.request)
        with self._cond:
            position = self.scheduler.add(item, force=force)
            waiting = tuple(self.scheduler.queue)
            self._cond.notify_all()
        self.report(Queue(waiting))
        return position

    def cancel(self, item: WorkItem) -> str | None:
        """"queued" (out of the queue: the caller settles it), "running" (it leaves at the next step) or None."""
        with self._cond:
            outcome = self.scheduler.cancel(item)
            waiting = tuple(self.scheduler.queue)
            self._cond.notify_all()
        if outcome == "queued":
            self.report(Queue(waiting))
        return outcome

    def position(self, item: WorkItem) -> int | None:
        with self._cond:
            return self.scheduler.position(item)

    def waiting(self) -> int:
        with self._cond:
            return len(self.scheduler.waiting)

    def stop_accepting(self) -> list[WorkItem]:
        with self._cond:
            taken = self.scheduler.stop_accepting()
            self._cond.notify_all()
        self.report(Queue(()))
        return taken

    def abort_running(self) -> None:
        """Every running row stops at its next step (the shutdown grace period is over)."""
        with self._cond:
            self.scheduler.abort_running()
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs; True if that happened within timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self.scheduler.idle:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the loop's thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        self.thread_ident = threading.get_ident()
        while (plan := self._next_plan()) is not None:
            try:
                self._iterate(plan)
            except Exception:  # never leave a caller waiting: whatever runs gets this outcome
                log.exception("iteration failed")
                self._fail_running(RuntimeError("the engine worker failed; see the server log"))

    def _next_plan(self) -> SchedulerOutput | None:
        with self._cond:
            while True:
                now = time.monotonic()
                plan = self.scheduler.schedule(now)
                if not plan.empty:
                    self._cond.notify_all()  # rows may have left: whoever waits for the loop to be idle looks again
                    return plan
                if self._stopping and not self.scheduler.stepping and not self.scheduler.waiting:
                    return None
                self._cond.wait(self.scheduler.next_wakeup(now))

    def _iterate(self, plan: SchedulerOutput) -> None:
        for item, why in plan.stopped:
            item.generation = None
            self.report(ItemEvent(item, Done(why)))
        if plan.admitted:
            self.report(Started(tuple(plan.admitted)))
            with self._cond:
                self.report(Queue(tuple(self.scheduler.queue)))
        output = self.execute(plan)
        with self._cond:
            done = self.scheduler.update_from_output(output)
            self._cond.notify_all()
        for item, exc in output.failed:
            item.generation = None
            self.report(ItemEvent(item, Done(exc)))
        if done:
            self._finisher.submit(self._finish, done)

    def execute(self, plan: SchedulerOutput) -> ExecutionOutput:
        """Prepare the requests that start, then run one step for the group's rows; nothing else."""
        out = ExecutionOutput()
        for item in plan.admitted:
            self.current = [item]
            try:
                item.generation = self.engine.prepare(item.request)
            except Exception as exc:  # a request the engine refuses, or a failed text encode: that row's alone
                out.failed.append((item, exc))
            finally:
                self.current = []
        refused = {id(item) for item, _ in out.failed}
        rows = [item for item in plan.rows if id(item) not in refused]
        if not rows:
            return out
        self.current = rows
        try:
            self.engine.step([item.generation for item in rows])
        except Exception as exc:  # the engine's failure is this group's outcome, not the loop's
            log.exception("step failed", extra={"request_id": ",".join(item.id for item in rows)})
            out.failed += [(item, exc) for item in rows]
            return out
        finally:
            self.current = []
        self.report(Batched(len(rows)))
        for item in rows:
            g = item.generation
            self.report(ItemEvent(item, Stepped(g.step_index, g.total_steps)))
            if item.request.preview_every and (picture := self.engine.preview(g)) is not None:
                self.report(ItemEvent(item, Previewed(g.step_index, g.total_steps, picture)))
            if g.done:
                out.done.append(item)
        return out

    def _finish(self, items: list[WorkItem]) -> None:
        """On the finisher thread, one row at a time: a failure to decode one request is that request's alone."""
        for item in items:
            try:
                (outcome,) = self.engine.finish([item.generation])
            except Exception as exc:
                log.exception("finishing failed", extra={"request_id": item.id})
                outcome = exc
            item.generation = None  # its latents and text states are not needed any more
            with self._cond:  # decided under the lock Cancel takes: an acknowledged cancel is never overtaken
                if item.cancel_requested:
                    outcome = Cancelled("cancelled before its result was recorded")
                item.settled = True
            # reported before the loop can look idle: the drain relies on it
            self.report(ItemEvent(item, Done(outcome)))
            with self._cond:
                self.scheduler.finished(item)
                self._cond.notify_all()

    def _fail_running(self, exc: BaseException) -> None:
        with self._cond:
            rows = self.scheduler.drop_running()
        for item in rows:
            item.generation = None
            self.report(ItemEvent(item, Done(exc)))
