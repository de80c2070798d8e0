"""The scheduler's policy, on plain data: no engine, no store, no clock but the `now` each test passes.

Admission order, the memory budget, bins taking turns, requests joining and leaving running groups, cancels and
deadlines between steps, a shutdown abort, and request-level batching. A fake step (`run`) stands in for the engine:
each row advances one step per schedule of its group and is done after its request's step count.
"""

from __future__ import annotations

import pytest

from engine.request import Cancelled, GenerationRequest
from server.core.scheduler import ExecutionOutput, Scheduler, SchedulerConfig
from server.core.work import DeadlineExceeded, Draining, QueueFull, ShutdownAbort, WorkItem
from server.storage import State

SQUARE, WIDE = (256, 256), (256, 512)


def item(name: str, *, images: int = 1, steps: int = 2, group=SQUARE, enqueued: float = 0.0,
         deadline: float | None = None, tenant: str = "") -> WorkItem:
    request = GenerationRequest(prompt=name, num_images=images, num_inference_steps=steps)
    return WorkItem(request, id=name, group=group, enqueued=enqueued, deadline=deadline, tenant=tenant)


def scheduler(**kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**kw))


def run(s: Scheduler, now: float = 1.0) -> tuple[list[str], list[str], list[str]]:
    """One iteration with a fake engine: (admitted, stepped rows, done) by id."""
    plan = s.schedule(now)
    done = []
    for row in plan.rows:
        row.progress = (row.progress[0] + 1, row.request.num_inference_steps)
        if row.progress[0] >= row.request.num_inference_steps:
            done.append(row)
    finished = s.update_from_output(ExecutionOutput(done=done))
    return [i.id for i in plan.admitted], [i.id for i in plan.rows], [i.id for i in finished]


def test_admission_is_oldest_first_within_the_batch_limits() -> None:
    s = scheduler(max_batch=2, max_batch_images=3, max_running_images=8)
    for name in ("a", "b", "c"):
        s.add(item(name))
    admitted, rows, _ = run(s)
    assert admitted == ["a", "b"] and rows == ["a", "b"]  # max_batch: c waits
    assert [i.id for i in s.waiting] == ["c"] and s.position(s.waiting[0]) == 0
    assert all(i.state == State.IN_PROGRESS and i.started == 1.0 for i in s.running)


def test_the_image_limit_of_a_group_counts_num_images() -> None:
    s = scheduler(max_batch=4, max_batch_images=3, max_running_images=8)
    s.add(item("two", images=2))
    s.add(item("also-two", images=2))
    s.add(item("one", images=1))
    admitted, _, _ = run(s)
    assert admitted == ["two", "one"]  # "also-two" would make 4 images; a smaller request of the group goes ahead


def test_the_memory_budget_stops_admission_and_nobody_overtakes_the_oldest() -> None:
    s = scheduler(max_batch=4, max_batch_images=4, max_running_images=3)
    s.add(item("big", images=2, group=SQUARE))
    s.add(item("wide", images=2, group=WIDE))  # its own group has room, but the budget has 1 image left
    s.add(item("small", images=1, group=WIDE))
    admitted, _, _ = run(s)
    assert admitted == ["big"]  # "small" fits the budget, but may not overtake "wide"
    assert [i.id for i in s.waiting] == ["wide", "small"]


def test_rows_being_decoded_keep_their_place_in_the_budget() -> None:
    s = scheduler(max_batch=4, max_batch_images=4, max_running_images=2)
    s.add(item("first", images=2, steps=1))
    s.add(item("next", images=1))
    assert run(s) == (["first"], ["first"], ["first"])  # done, now decoding: still 2 images in flight
    admitted, rows, _ = run(s)
    assert admitted == [] and rows == []
    s.finished(s.finishing[0])
    assert run(s)[0] == ["next"]


def test_bins_take_turns_and_a_full_group_lets_other_sizes_in() -> None:
    s = scheduler(max_batch=1, max_batch_images=4, max_running_images=8)
    s.add(item("square", steps=3))
    s.add(item("square-2", steps=3))
    s.add(item("wide", steps=3, group=WIDE))
    admitted, rows, _ = run(s)
    assert admitted == ["square", "wide"]  # the square group is full after one; the wide request goes ahead
    assert rows == ["square"]
    assert run(s)[1] == ["wide"]  # the next step is the other group's
    assert run(s)[1] == ["square"]


def test_a_request_joins_a_running_group_and_leaves_when_it_is_done() -> None:
    s = scheduler(max_batch=4, max_batch_images=4)
    s.add(item("long", steps=4))
    run(s)
    s.add(item("short", steps=1))
    admitted, rows, done = run(s)
    assert admitted == ["short"] and rows == ["long", "short"] and done == ["short"]
    assert run(s)[1] == ["long"]  # "short" left after its one step; "long" goes on alone


def test_cancel_takes_a_queued_request_out_and_stops_a_running_one_at_the_next_step() -> None:
    s = scheduler(max_batch=1)
    running, queued = item("running", steps=5), item("queued")
    s.add(running)
    s.add(queued)
    run(s)
    assert s.cancel(queued) == "queued" and not s.waiting
    assert s.cancel(running) == "running" and running in s.running
    plan = s.schedule(2.0)
    assert [(i.id, type(why)) for i, why in plan.stopped] == [("running", Cancelled)]
    assert plan.rows == [] and not s.running
    assert s.cancel(item("stranger")) is None


def test_deadlines_stop_running_and_waiting_requests() -> None:
    s = scheduler(max_batch=1)
    s.add(item("running", steps=5, deadline=5.0))
    s.add(item("waiting", deadline=3.0))
    run(s, now=1.0)
    plan = s.schedule(4.0)
    assert [(i.id, type(why)) for i, why in plan.stopped] == [("waiting", DeadlineExceeded)]
    plan = s.schedule(6.0)
    assert [(i.id, type(why)) for i, why in plan.stopped] == [("running", DeadlineExceeded)]
    assert s.next_wakeup(6.0) is None


def test_failed_rows_leave_their_group() -> None:
    s = scheduler()
    s.add(item("a", steps=3))
    s.add(item("b", steps=3))
    plan = s.schedule(1.0)
    a, b = plan.rows
    s.update_from_output(ExecutionOutput(failed=[(a, RuntimeError("refused"))]))
    assert s.schedule(1.0).rows == [b]


def test_draining_refuses_new_work_hands_back_the_queue_and_aborts_running_rows() -> None:
    s = scheduler(max_batch=1)
    s.add(item("running", steps=5))
    s.add(item("waiting"))
    run(s)
    assert [i.id for i in s.stop_accepting()] == ["waiting"]
    with pytest.raises(Draining):
        s.add(item("late"))
    s.add(item("recovered"), force=True)  # work claimed from the store is never refused
    s.abort_running()
    plan = s.schedule(2.0)
    assert [(i.id, type(why)) for i, why in plan.stopped] == [("running", ShutdownAbort)]


def test_the_queue_is_bounded() -> None:
    s = scheduler(max_queue=2)
    s.add(item("a"))
    s.add(item("b"))
    with pytest.raises(QueueFull):
        s.add(item("c"))
    s.add(item("recovered"), force=True)
    assert len(s.waiting) == 3


def test_request_level_batching_waits_for_companions_then_runs_the_batch_to_its_end() -> None:
    s = scheduler(max_batch=2, max_batch_images=2, max_wait_s=0.5, continuous=False)
    s.add(item("first", steps=3, enqueued=0.0))
    assert s.schedule(0.1).empty and s.next_wakeup(0.1) == pytest.approx(0.4)  # waits for a companion
    s.add(item("second", steps=1, enqueued=0.2))
    assert run(s, now=0.2)[0] == ["first", "second"]  # the batch is full: it starts at once
    s.add(item("third", enqueued=0.3))
    for now in (5.0, 6.0):  # nobody joins while the batch runs, however long "third" has waited
        assert run(s, now)[0] == []
    assert not s.stepping
    assert run(s, now=7.0)[0] == ["third"]


def test_request_level_batching_starts_alone_after_the_wait() -> None:
    s = scheduler(max_batch=4, max_wait_s=0.5, continuous=False)
    s.add(item("alone", enqueued=0.0))
    assert run(s, now=0.4)[0] == []
    assert run(s, now=0.6)[0] == ["alone"]


def test_tenants_take_turns_so_one_burst_does_not_starve_another_tenant() -> None:
    s = scheduler(max_queue=100, max_batch=2, max_batch_images=2)
    for n in range(60):
        s.add(item(f"a{n}", tenant="alice"))
    late = item("b0", tenant="bob")
    assert s.add(late) == 1  # served second, not 61st
    assert [i.id for i in s.queue[:4]] == ["a0", "b0", "a1", "a2"]
    admitted, _, _ = run(s)
    assert admitted == ["a0", "b0"]
    assert s.position(s.queue[0]) == 0 and s.queue[0].id == "a1"


def test_with_one_tenant_the_queue_is_arrival_order() -> None:
    s = scheduler(max_queue=10)
    for n in range(5):
        s.add(item(f"r{n}"))
    assert [i.id for i in s.queue] == [f"r{n}" for n in range(5)] and s.position(s.waiting[3]) == 3
