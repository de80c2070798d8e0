"""The scheduler: which requests wait, which run together, and which leave, decided once per denoising step.

Plain data in and out (vLLM's `schedule` -> `execute_model` -> `update_from_output`): it never calls the engine, the
store or a clock of its own (the caller passes `now`), so its policy is tested without an engine. Each `schedule`

  1. stops rows that must leave: cancelled, past their deadline, or every running row once a shutdown aborts them
     (and waiting requests whose deadline passed);
  2. admits waiting requests into the running group of their latent size (one group per size bin), in fair
     order (tenants take turns, each tenant's requests oldest first: `fair_order`), while the group has room
     (`max_batch` requests, `max_batch_images` images) and the memory budget (`max_running_images` across groups,
     rows being decoded included) allows; nobody overtakes the next in that order once the budget is spent, but a
     request of another size may go ahead of one whose group is full;
  3. picks the group whose turn it is to step (groups take turns in the order they started).

So a request that arrives while a batch runs starts at the next step, and a 4-step request leaves after 4 steps
however long its companions run (iteration-level scheduling). `continuous=False` is request-level batching: a
batch forms only while nothing runs, waiting up to `max_wait_s` for companions, and runs until its last row is done.

Rows that are done go on to `finishing` (decode, safety, encode happen elsewhere) and keep their place in the memory
budget until `finished` is called for them.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from server.storage.states import State

from .work import Draining, QueueFull, ShutdownAbort, WorkItem


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 64  # requests that may wait; past it QueueFull
    max_batch: int = 4  # requests stepped together per size bin
    max_batch_images: int = 4  # images stepped together per size bin
    max_running_images: int | None = None  # the memory budget across bins; default max_batch_images
    max_wait_s: float = 0.01  # request-level batching: how long the oldest request waits for companions
    continuous: bool = True

    @property
    def image_budget(self) -> int:
        return self.max_running_images or self.max_batch_images


@dataclass
class SchedulerOutput:
    """What one step does: rows that leave now (with why), requests that start (the engine prepares them), and the
    group that steps (its rows, the started ones of that group included)."""

    stopped: list[tuple[WorkItem, BaseException]] = field(default_factory=list)
    admitted: list[WorkItem] = field(default_factory=list)
    group: Hashable = None
    rows: list[WorkItem] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.stopped or self.admitted or self.rows)


@dataclass
class ExecutionOutput:
    """What the engine made of a step: rows that failed (to prepare, or the step itself) and rows that are done."""

    failed: list[tuple[WorkItem, BaseException]] = field(default_factory=list)
    done: list[WorkItem] = field(default_factory=list)


def fair_order(items: Sequence[WorkItem]) -> list[WorkItem]:
    """Waiting requests in the order they are served: tenants take turns (round robin, in the order of their oldest
    waiting request), each tenant's own oldest first. One tenant's burst of 60 does not make another tenant's single
    request wait behind all of them; with one tenant it is arrival order."""
    queues: dict[str, list[WorkItem]] = {}
    for item in items:
        queues.setdefault(item.tenant, []).append(item)
    return [item for turn in itertools.zip_longest(*queues.values()) for item in turn if item is not None]


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: list[WorkItem] = []
        self.groups: dict[Hashable, list[WorkItem]] = {}  # running, by size bin, in the order they started
        self.finishing: list[WorkItem] = []  # done stepping, being decoded: still in the memory budget
        self.accepting = True
        self.aborting = False  # the shutdown grace period ran out: every running row stops
        self._last_group: Hashable = None

    # -- requests in and out ----------------------------------------------------------------------------------
    def add(self, item: WorkItem, *, force: bool = False) -> int:
        """Queue an item (its `group` already set) and return its position (0 = next). `force`: past max_queue and
        while draining (work recovered from the store, which must not be refused)."""
        if not force:
            if not self.accepting:
                raise Draining()
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull()
        self.waiting.append(item)
        return self.queue.index(item)

    @property
    def queue(self) -> list[WorkItem]:
        """The waiting requests in the order they will be served (fair_order)."""
        return fair_order(self.waiting)

    def position(self, item: WorkItem) -> int | None:
        try:
            return self.queue.index(item)
        except ValueError:
            return None

    def cancel(self, item: WorkItem) -> str | None:
        """"queued": taken out of the queue (the caller settles it); "running": it leaves at the next step, or,
        past its last step, its outcome will be Cancelled; None: the scheduler does not hold it, or its outcome is
        already decided."""
        if item in self.waiting:
            self.waiting.remove(item)
            return "queued"
        if item in self.running and not item.settled:
            item.cancel_requested = True
            return "running"
        return None

    def stop_accepting(self) -> list[WorkItem]:
        """Refuse new work and hand back what waits (for the caller to settle)."""
        self.accepting = False
        taken, self.waiting = self.waiting, []
        return taken

    def abort_running(self) -> None:
        self.aborting = True

    def finished(self, item: WorkItem) -> None:
        """A finishing row has its outcome: its place in the memory budget is free."""
        if item in self.finishing:
            self.finishing.remove(item)

    @property
    def running(self) -> list[WorkItem]:
        return [item for rows in self.groups.values() for item in rows] + list(self.finishing)

    @property
    def stepping(self) -> bool:
        return bool(self.groups)

    def drop_running(self) -> list[WorkItem]:
        """Take every stepping row out (the engine loop failed under them); the caller settles them."""
        rows = [item for rows in self.groups.values() for item in rows]
        self.groups.clear()
        return rows

    @property
    def idle(self) -> bool:
        return not self.groups and not self.finishing

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until a `schedule` could do something that nothing else will announce (a deadline passing, a
        request-level batch's wait ending); None when only a new request or a finished row can change anything."""
        times = [item.deadline for item in self.waiting if item.deadline is not None]
        if self.waiting and not self.config.continuous and not self.groups:
            times.append(self.waiting[0].enqueued + self.config.max_wait_s)
        return max(0.0, min(times) - now) if times else None

    # -- one step ---------------------------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        self._stop_rows(now, out)
        self._admit(now, out)
        out.group = self._next_group()
        out.rows = list(self.groups[out.group]) if out.group is not None else []
        return out

    def update_from_output(self, output: ExecutionOutput) -> list[WorkItem]:
        """Failed rows leave; done rows leave their group for `finishing`. Returns the done rows."""
        for item, _ in output.failed:
            self._leave(item)
        for item in output.done:
            self._leave(item)
            self.finishing.append(item)
        return list(output.done)

    # -- policy -----------------------------------------------------------------------------------------------
    def _stop_rows(self, now: float, out: SchedulerOutput) -> None:
        for rows in list(self.groups.values()):
            for item in list(rows):
                why = ShutdownAbort() if self.aborting else item.should_stop(now)
                if why is not None:
                    self._leave(item)
                    out.stopped.append((item, why))
        for item in list(self.waiting):
            why = item.should_stop(now)
            if why is not None:
                self.waiting.remove(item)
                out.stopped.append((item, why))

    def _admit(self, now: float, out: SchedulerOutput) -> None:
        if self.config.continuous:
            chosen = self._continuous_admissions()
        elif not self.groups and self._batch_ready(now):
            chosen = self._companions(self.queue[0])
        else:
            chosen = []
        for item in chosen:
            self.waiting.remove(item)
            item.state = State.IN_PROGRESS
            item.started = now
            self.groups.setdefault(item.group, []).append(item)
            out.admitted.append(item)

    def _continuous_admissions(self) -> list[WorkItem]:
        cfg = self.config
        in_flight = sum(item.images for item in self.running)
        sizes = {key: (len(rows), sum(i.images for i in rows)) for key, rows in self.groups.items()}
        chosen = []
        for item in self.queue:
            count, images = sizes.get(item.group, (0, 0))
            if in_flight and in_flight + item.images > cfg.image_budget:
                break  # the memory budget is spent: nobody overtakes the oldest waiting request
            if count and (count >= cfg.max_batch or images + item.images > cfg.max_batch_images):
                continue  # its group is full; requests of other sizes may go ahead
            chosen.append(item)
            sizes[item.group] = (count + 1, images + item.images)
            in_flight += item.images
        return chosen

    def _batch_ready(self, now: float) -> bool:
        """Request-level batching: the oldest request's batch is full, or it has waited long enough."""
        if not self.waiting:
            return False
        head = self.queue[0]
        return (len(self._companions(head)) >= self.config.max_batch
                or now >= head.enqueued + self.config.max_wait_s or not self.accepting)

    def _companions(self, head: WorkItem) -> list[WorkItem]:
        batch, images = [head], head.images
        for item in self.queue[1:]:
            if len(batch) >= self.config.max_batch:
                break
            if item.group == head.group and images + item.images <= self.config.max_batch_images:
                batch.append(item)
                images += item.images
        return batch

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

    def _leave(self, item: WorkItem) -> None:
        rows = self.groups.get(item.group)
        if rows is not None and item in rows:
            rows.remove(item)
            if not rows:
                del self.groups[item.group]
