"""The engine loop over a fake engine: it runs what the scheduler decides and reports every event, in order.

The fake engine steps counters, so these run in milliseconds; what they check is the loop's contract: rows join at
step boundaries and leave when done, a cancel between steps stops a row, a failing prepare or step is that row's or
that group's outcome and the loop goes on, decoding happens on the finisher, and the engine is closed at stop.
"""

from __future__ import annotations

import threading
import time

from engine.request import Cancelled, GenerationRequest, GenerationResult
from server.core.engine_loop import Batched, EngineLoop, ItemEvent, Queue, Started
from server.core.scheduler import Scheduler, SchedulerConfig
from server.core.work import Done, Stepped, WorkItem
from tests.support.fakes import FakeEngine


class Recorder:
    def __init__(self):
        self.events, self._cond = [], threading.Condition()

    def __call__(self, event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def outcomes(self, count: int, timeout: float = 10.0) -> dict[str, object]:
        """The first `count` outcomes, by prompt, once they are reported."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                done = [e for e in self.events if isinstance(e, ItemEvent) and isinstance(e.update, Done)]
                if len(done) >= count:
                    return {e.item.request.prompt: e.update.outcome for e in done}
                assert time.monotonic() < end, "the loop did not report in time"
                self._cond.wait(0.05)


def loop_with(engine: FakeEngine, **cfg) -> tuple[EngineLoop, Recorder]:
    recorder = Recorder()
    loop = EngineLoop(engine, Scheduler(SchedulerConfig(**cfg)), recorder)
    return loop, recorder


def item(prompt: str, steps: int = 2) -> WorkItem:
    return WorkItem(GenerationRequest(prompt=prompt, num_inference_steps=steps, image_size=(256, 256)))


def test_rows_join_at_step_boundaries_and_leave_when_done() -> None:
    engine = FakeEngine(step_delay=0.02)
    loop, recorder = loop_with(engine, max_batch=4, max_batch_images=4)
    loop.start()
    try:
        loop.submit(item("long", steps=6))
        while len(engine.steps) < 2:
            time.sleep(0.005)
        loop.submit(item("short", steps=2))
        outcomes = recorder.outcomes(2)
    finally:
        loop.stop(5)
    assert all(isinstance(o, GenerationResult) for o in outcomes.values())
    joined = [i for i, rows in enumerate(engine.steps) if "short" in rows]
    assert len(joined) == 2 and joined[0] >= 2 and joined[1] == joined[0] + 1  # two steps, side by side with "long"
    assert sum("long" in rows for rows in engine.steps) == 6
    kinds = [type(e.update) if isinstance(e, ItemEvent) else type(e) for e in recorder.events]
    assert kinds.index(Started) < kinds.index(Batched) < kinds.index(Stepped) < kinds.index(Done)
    assert isinstance(recorder.events[0], Queue) and engine.closed


def test_a_cancel_between_steps_stops_that_row_only() -> None:
    engine = FakeEngine(step_delay=0.02)
    loop, recorder = loop_with(engine)
    loop.start()
    try:
        doomed, other = item("doomed", steps=50), item("other", steps=4)
        loop.submit(doomed)
        loop.submit(other)
        while len(engine.steps) < 1:
            time.sleep(0.005)
        assert loop.cancel(doomed) == "running"
        outcomes = recorder.outcomes(2)
    finally:
        loop.stop(5)
    assert isinstance(outcomes["doomed"], Cancelled) and isinstance(outcomes["other"], GenerationResult)
    assert sum("doomed" in rows for rows in engine.steps) < 50


def test_a_cancel_past_the_last_step_ends_cancelled_until_the_outcome_is_decided() -> None:
    """CANCELLATION_REQUESTED promises CANCELED: a row being decoded honours a cancel too; once its outcome is
    decided the loop says it no longer holds it (the caller answers from the outcome)."""
    engine = FakeEngine(finish_delay=0.3)
    loop, recorder = loop_with(engine, max_batch=2, max_batch_images=2)
    loop.start()
    try:
        decoding, finished = item("decoding", steps=1), item("finished", steps=1)
        loop.submit(decoding)
        loop.submit(finished)
        while not (decoding in loop.scheduler.finishing and finished in loop.scheduler.finishing):
            time.sleep(0.005)
        assert loop.cancel(decoding) == "running"
        recorder.outcomes(1)  # the finisher decodes one row at a time: "decoding" first
        while not finished.settled:
            time.sleep(0.005)
        assert loop.cancel(finished) is None
        outcomes = recorder.outcomes(2)
    finally:
        loop.stop(5)
    assert isinstance(outcomes["decoding"], Cancelled) and isinstance(outcomes["finished"], GenerationResult)


def test_a_failing_prepare_or_step_fails_its_rows_and_the_loop_goes_on() -> None:
    engine = FakeEngine(fail_prepare="refused", fail_step_at=2)
    loop, recorder = loop_with(engine, max_batch=4, max_batch_images=4)
    loop.start()
    try:
        for prompt in ("refused", "a", "b"):
            loop.submit(item(prompt, steps=3))
        outcomes = recorder.outcomes(3)
        loop.submit(item("after"))
        after = recorder.outcomes(4)["after"]
    finally:
        loop.stop(5)
    assert str(outcomes["refused"]) == "refused by the engine"
    assert str(outcomes["a"]) == str(outcomes["b"]) == "simulated device failure"
    assert isinstance(after, GenerationResult)


def test_stop_accepting_hands_back_the_queue_and_abort_stops_the_running() -> None:
    engine = FakeEngine(step_delay=0.01)
    loop, recorder = loop_with(engine, max_batch=1)
    loop.start()
    try:
        loop.submit(item("running", steps=1000))
        loop.submit(item("waiting"))
        while not engine.steps:
            time.sleep(0.005)
        assert [i.request.prompt for i in loop.stop_accepting()] == ["waiting"]
        assert not loop.wait_idle(0.05)
        loop.abort_running()
        assert loop.wait_idle(5)
        assert type(recorder.outcomes(1)["running"]).__name__ == "ShutdownAbort"
    finally:
        loop.stop(5)
