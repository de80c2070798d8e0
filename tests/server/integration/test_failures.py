"""Failure paths: an engine that fails mid-batch, an export the engine cannot use, a stored request the engine now
refuses, and running work stopped when the shutdown grace period runs out."""

from __future__ import annotations

import copy
import json
import shutil

import grpc
import pytest

from engine.manifest import ManifestError
from protos.pixart.v1 import pixart_pb2 as pb
from server.client import Client
from server.storage import SqliteStore
from tests.support.servers import ServerThread, config, shared_engine, wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CHEAP = dict(num_inference_steps=2, image_size=(256, 256))


class FailingStep:
    """The real engine, except that its n-th step raises (a device error, an out-of-memory)."""

    def __init__(self, engine, fail_at: int):
        self.engine, self.fail_at, self.steps = engine, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, generations):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("simulated device failure")
        return self.engine.step(generations)


def test_an_engine_failure_mid_batch_fails_that_batch_and_the_server_goes_on(tmp_path) -> None:
    engine = FailingStep(shared_engine(), fail_at=2)
    # a batch waits up to 1 s for companions: each Submit commits (and claims) before the next is sent
    # request-level batching: one batch formed from both, so that the failure hits both
    srv = ServerThread(config(tmp_path / "store", max_batch=4, max_batch_images=4, max_wait_ms=1000,
                              batching="request"), engine=engine)
    try:
        with Client(srv.address, timeout=60) as c:
            first = c.submit("one", num_inference_steps=4, image_size=(256, 256))
            second = c.submit("two", num_inference_steps=4, image_size=(256, 256))
            for rid in (first, second):
                status = wait_for(lambda rid=rid: (s := c.status(rid)).state in (pb.FAILED, pb.COMPLETED) and s)
                assert status.state == pb.FAILED and status.error.code == grpc.StatusCode.INTERNAL.value[0]
                # a stable message and a correlation id; the exception's own text stays in the log
                assert "simulated device failure" not in status.error.message
                assert "correlation id" in status.error.message
            assert c.generate("after the failure", **CHEAP).images  # the worker survived
    finally:
        srv.close()


def test_a_stale_or_broken_export_fails_at_load_with_a_clear_message(tmp_path) -> None:
    from engine import Engine

    source = shared_engine().path
    stale = tmp_path / "stale"
    shutil.copytree(source, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    for change, expected in (
        ({"format": "pixart-sigma-onnx/0"}, "re-export"),
        ({"files": {k: v for k, v in manifest["files"].items() if k != "tokenizer"}}, "files.tokenizer"),
    ):
        (stale / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ManifestError, match=expected):
            Engine.load(stale)
    (stale / "manifest.json").write_text(json.dumps(manifest))
    (stale / manifest["files"]["vae_decoder"]).unlink()
    with pytest.raises(ManifestError, match="missing"):
        Engine.load(stale)
    with pytest.raises(ManifestError, match="not an export folder"):
        Engine.load(tmp_path)


def test_a_stored_request_the_engine_now_refuses_fails_visibly_at_recovery(tmp_path) -> None:
    store = SqliteStore(tmp_path / "store")
    request = pb.GenerateRequest(prompt="checked", enable_safety_checker=True, num_inference_steps=2)
    rid = "ab" * 16
    store.add(rid, request.SerializeToString())
    store.close()
    engine = copy.copy(shared_engine())
    engine.safety_checker = None  # the export was replaced by one without a checker
    srv = ServerThread(config(tmp_path / "store"), engine=engine)
    try:
        with Client(srv.address, timeout=30) as c:
            status = wait_for(lambda: (s := c.status(rid)).state != pb.IN_QUEUE and s)
            assert status.state == pb.FAILED
            assert status.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "enable_safety_checker" in status.error.message
    finally:
        srv.close()


def test_grace_period_over_stops_running_work_and_keeps_it_for_the_next_start(tmp_path) -> None:
    srv = ServerThread(config(tmp_path / "store", grace_s=0.5))
    with Client(srv.address, timeout=60) as c:
        rid = c.submit("too long for the grace period", num_inference_steps=100, num_images=8,
                       image_size=(256, 256))
        wait_for(lambda: c.status(rid).state == pb.IN_PROGRESS and c.status(rid).progress.step >= 1)
    srv.run(srv.app.drain())  # after 0.5 s the running request is stopped at its next step
    assert srv.app.loop.scheduler.running == []
    row = SqliteStore(tmp_path / "store").get(rid)
    assert row.state == "IN_PROGRESS"  # durable: kept for the next start, not failed
    srv.close()
    again = ServerThread(config(tmp_path / "store"))
    try:
        with Client(again.address, timeout=60) as c:
            wait_for(lambda: c.status(rid).state == pb.COMPLETED, 120)
            assert any("recovered" in line.message for line in c.status(rid, logs=True).logs)
    finally:
        again.close()
