"""The request service, composed as `pixart serve` composes it (App) but over a fake engine and a SQLite store in a
temporary folder: what every transport relies on, without a model, in well under a second per test.

Submit commits before it answers; validation names every field; refusals say why (loading, draining, full);
a call that waits hears its queue position first, then its steps, then its outcome, which is recorded before it is
told; cancel answers for queued, running, ended and unknown requests; lookup answers from the store once a request
has ended here.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from engine.request import Cancelled, GenerationRequest, GenerationResult, InvalidRequest
from server.app import App
from server.config import ServerConfig
from server.core.service import LOADING
from server.core.work import Done, Draining, Logged, Queued, QueueFull, Stepped, TenantLimit, Unavailable
from server.storage import CANCELED, COMPLETED, IN_QUEUE
from tests.support.fakes import FakeEngine

pytestmark = pytest.mark.timeout(30)
CHEAP = dict(num_inference_steps=2, image_size=(256, 256))


def run(coro):
    return asyncio.run(coro)


def app_for(tmp_path: Path, engine: FakeEngine | None = None, **settings) -> App:
    cfg = replace(ServerConfig(engine="unused", port=0, http_port=None, store=str(tmp_path / "store"),
                               warmup=False, poll_s=0.05, lease_s=5.0), **settings)
    return App(cfg, engine_loader=lambda *_a, **_o: engine or FakeEngine())


async def started(app: App, load: bool = True) -> App:
    await app.start()
    if load:
        await app.load_engine()
    return app


async def until(predicate, timeout: float = 10.0):
    end = asyncio.get_running_loop().time() + timeout
    while not (value := await predicate()):
        assert asyncio.get_running_loop().time() < end, "not in time"
        await asyncio.sleep(0.01)
    return value


def test_submit_is_committed_runs_and_ends_completed_in_the_store(tmp_path) -> None:
    async def main():
        app = await started(app_for(tmp_path))
        try:
            rid, position = await app.service.submit(GenerationRequest(prompt="a cat", seed=3, **CHEAP))
            assert position == 0 and app.store.get(rid) is not None  # in the store when the id is returned
            found = await until(lambda: _ended(app, rid))
            assert found.state == COMPLETED and found.row is not None
            assert [line["message"] for line in found.logs] == ["started", "completed"]
            result = app.service.stored(found.row)
            assert result.request_id == rid and result.seed == 3 and result.images[0].file_data
        finally:
            await app.drain()

    run(main())


def test_a_submit_whose_follow_up_fails_after_the_commit_still_answers_its_id(tmp_path) -> None:
    """Answering an error for a committed request makes the caller retry it, and it runs twice."""
    async def main():
        app = await started(app_for(tmp_path))
        try:
            async def broken() -> None:
                raise RuntimeError("claim failed")

            app.service.replica.claim = broken
            rid, position = await app.service.submit(GenerationRequest(prompt="once", **CHEAP))
            assert app.store.get(rid) is not None and position == 0
        finally:
            await app.drain()

    run(main())


async def _ended(app: App, rid: str):
    found = await app.service.lookup(rid)
    return found if found is not None and found.row is not None else None


def test_refusals_name_every_field_and_say_why(tmp_path) -> None:
    async def main():
        app = await started(app_for(tmp_path, max_queue=1, webhook_allow=[]), load=False)
        bad = GenerationRequest(prompt="", num_images=9, **CHEAP)
        with pytest.raises(Unavailable, match=LOADING):
            await app.service.submit(bad)
        await app.load_engine()
        with pytest.raises(InvalidRequest) as refused:
            await app.service.submit(bad, webhook_url="http://127.0.0.1/hook")
        assert [f for f, _ in refused.value.violations] == ["webhook_url", "prompt", "num_images"]
        app.service.draining = True
        with pytest.raises(Draining):
            await app.service.start(GenerationRequest(prompt="late", **CHEAP))
        app.service.draining = False
        await app.replica.stop_claiming()  # this replica claims nothing more: what is queued stays queued
        app.store.add("ab" * 16, b"")
        with pytest.raises(QueueFull):
            await app.service.submit(GenerationRequest(prompt="one too many", **CHEAP))
        await app.drain()

    run(main())


def test_a_waiting_call_hears_its_position_steps_and_then_its_recorded_outcome(tmp_path) -> None:
    async def main():
        app = await started(app_for(tmp_path))
        try:
            call = await app.service.start(GenerationRequest(prompt="a fox", sync_mode=False, num_images=2, **CHEAP))
            updates = [u async for u in call.updates()]
            assert isinstance(updates[0], Queued) and updates[0].position == 0
            assert [(u.step, u.total) for u in updates if isinstance(u, Stepped)] == [(1, 2), (2, 2)]
            assert [u.line["message"] for u in updates if isinstance(u, Logged)] == ["started", "completed"]
            assert isinstance(updates[-1], Done) and isinstance(updates[-1].outcome, GenerationResult)
            row = app.store.get(call.id)  # recorded before the caller was told: its images are served by URL
            assert row.state == COMPLETED and app.store.image_path(call.id, "image_1.png") is not None
            result = app.service.result(call.item)
            assert [img.url.split("?")[0].rsplit("/", 1)[-1] for img in result.images] == ["image_0.png",
                                                                                          "image_1.png"]
        finally:
            await app.drain()

    run(main())


def test_cancel_answers_for_queued_running_ended_and_unknown_requests(tmp_path) -> None:
    async def main():
        app = await started(app_for(tmp_path, FakeEngine(step_delay=0.05), max_batch=1, max_batch_images=1))
        try:
            first, _ = await app.service.submit(GenerationRequest(prompt="first", num_inference_steps=100,
                                                                  image_size=(256, 256)))
            await until(lambda: _state(app, first, "IN_PROGRESS"))
            second, position = await app.service.submit(GenerationRequest(prompt="second", **CHEAP))
            assert position == 0 and await _state(app, second, "IN_QUEUE")  # next in line behind the running one
            assert await app.service.cancel(second) == "queued"
            assert app.store.get(second).state == CANCELED  # answered once recorded
            assert await app.service.cancel(first) == "running"
            found = await until(lambda: _ended(app, first))
            assert found.state == CANCELED and app.store.get(first).cancel_requested
            assert await app.service.cancel(first) == "ended"
            assert await app.service.cancel("0" * 32) == "unknown"
        finally:
            await app.drain()

    run(main())


def test_a_cancel_acknowledged_past_the_last_step_ends_cancelled(tmp_path) -> None:
    """CANCELLATION_REQUESTED means CANCELED: also for a request past its last step (being decoded), and a cancel
    that comes after its outcome was recorded is told it had ended."""
    async def main():
        engine = FakeEngine(finish_delay=0.5)
        app = await started(app_for(tmp_path, engine, max_batch=1, max_batch_images=1))
        try:
            rid, _ = await app.service.submit(GenerationRequest(prompt="decoding", **CHEAP))

            async def decoding():
                item = app.outputs.live.get(rid)
                return item is not None and item in app.loop.scheduler.finishing and not item.settled

            await until(decoding)
            assert await app.service.cancel(rid) == "running"
            found = await until(lambda: _ended(app, rid))
            assert found.state == CANCELED and app.store.get(rid).result is None
            assert await app.service.cancel(rid) == "ended"
            other, _ = await app.service.submit(GenerationRequest(prompt="done", **CHEAP))
            assert (await until(lambda: _ended(app, other))).state == COMPLETED
            assert await app.service.cancel(other) == "ended"
        finally:
            await app.drain()

    run(main())


def test_a_keys_limits_refuse_its_tenant_alone_naming_the_limit(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("busy k1 max_active=1\nquick k2 rate=1\nfree k3\n")

    async def main():
        app = await started(app_for(tmp_path, FakeEngine(step_delay=0.05), api_keys_file=str(keys), max_batch=1))
        try:
            long = GenerationRequest(prompt="long", num_inference_steps=100, image_size=(256, 256))
            rid, _ = await app.service.submit(long, tenant="busy")
            with pytest.raises(TenantLimit, match="max_active"):
                await app.service.submit(GenerationRequest(prompt="more", **CHEAP), tenant="busy")
            with pytest.raises(TenantLimit, match="max_active"):  # calls that wait count too
                await app.service.start(GenerationRequest(prompt="more", **CHEAP), tenant="busy")
            await app.service.submit(GenerationRequest(prompt="quick", **CHEAP), tenant="quick")
            with pytest.raises(TenantLimit, match="per second"):
                await app.service.submit(GenerationRequest(prompt="again", **CHEAP), tenant="quick")
            for n in range(3):  # other tenants are not limited by them
                await app.service.submit(GenerationRequest(prompt=f"free {n}", **CHEAP), tenant="free")
            assert await app.service.cancel(rid) == "running"
            await until(lambda: _ended(app, rid))
            await app.service.submit(GenerationRequest(prompt="now", **CHEAP), tenant="busy")  # room again
        finally:
            await app.drain()

    run(main())


async def _started(item) -> bool:
    return item.state == "IN_PROGRESS"


async def _state(app: App, rid: str, state: str) -> bool:
    found = await app.service.lookup(rid)
    return found is not None and found.state == state


def test_a_caller_that_goes_away_frees_its_place(tmp_path) -> None:
    async def main():
        app = await started(app_for(tmp_path, FakeEngine(step_delay=0.05), max_batch=1, max_batch_images=1))
        try:
            running = await app.service.start(GenerationRequest(prompt="long", num_inference_steps=100,
                                                                image_size=(256, 256)))
            await until(lambda: _started(running.item))
            waiting = await app.service.start(GenerationRequest(prompt="short", **CHEAP))
            assert waiting.position == 0 and waiting.item.state == IN_QUEUE
            waiting.cancel()
            running.cancel()
            assert isinstance(await waiting.outcome(), Cancelled)
            assert isinstance(await running.outcome(), Cancelled)
            assert app.loop.wait_idle(5) and not app.outputs.live
        finally:
            await app.drain()

    run(main())
