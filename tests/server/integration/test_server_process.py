"""The server as a process: SIGTERM while busy loses no accepted request; kill -9 and a restart keep the queue.

Each test runs `python -m server.cli serve` on loopback port 0 with its own store folder, then a second server
on the same store, and checks every request it was told yes to through Status / Result.
"""

from __future__ import annotations

import signal

import grpc
import pytest

from protos.pixart.v1 import pixart_pb2 as pb
from server.client import Client, PixArtError
from tests.support.servers import ServerProcess, health, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

CHEAP = dict(num_inference_steps=2, image_size=(256, 256))


def _finish_all(address: str, ids: list[str], timeout: float = 150) -> dict[str, int]:
    with Client(address, timeout=30) as c:
        wait_for(lambda: all(c.status(i).state in (pb.COMPLETED, pb.FAILED, pb.CANCELED) for i in ids), timeout, 0.2)
        return {i: c.status(i).state for i in ids}


def test_sigterm_while_busy_loses_nothing(tmp_path) -> None:
    store = tmp_path / "store"
    srv = ServerProcess(store, "--grace", "60", "--max-batch", "1")
    try:
        with Client(srv.address, timeout=30) as c:
            running = c.submit("running at SIGTERM", seed=1, num_inference_steps=100, num_images=4,
                               image_size=(256, 256))
            wait_for(lambda: c.status(running).state == pb.IN_PROGRESS)
            queued = [c.submit(f"queued {i}", seed=10 + i, **CHEAP) for i in range(2)]
            assert all(c.status(q).state == pb.IN_QUEUE for q in queued)
            srv.signal(signal.SIGTERM)
            wait_for(lambda: _unavailable_or_not_serving(srv.address), 30)
            with pytest.raises(PixArtError) as e:
                c.submit("too late", **CHEAP)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert srv.wait(90) == 0  # drained: the running request finished within the grace period
    finally:
        srv.close()

    again = ServerProcess(store, "--max-batch", "1")
    try:
        with Client(again.address, timeout=30) as c:
            # the request that was running finished before the exit; the queued ones run now
            assert c.status(running).state == pb.COMPLETED
            assert c.result(running).seed == 1
            states = _finish_all(again.address, queued)
            assert set(states.values()) == {pb.COMPLETED}
            assert [c.result(q).seed for q in queued] == [10, 11]
    finally:
        again.close()


def _unavailable_or_not_serving(address: str) -> bool:
    try:
        return health(address) != 1  # 1 = SERVING
    except grpc.RpcError:
        return True


def test_kill_9_and_restart_keeps_the_queue(tmp_path) -> None:
    store = tmp_path / "store"
    srv = ServerProcess(store, "--max-batch", "1")
    try:
        with Client(srv.address, timeout=30) as c:
            done = c.submit("done before the crash", seed=5, **CHEAP)
            wait_for(lambda: c.status(done).state == pb.COMPLETED)
            running = c.submit("running at the crash", seed=6, num_inference_steps=100, num_images=8,
                               image_size=(256, 256))
            wait_for(lambda: c.status(running).state == pb.IN_PROGRESS)
            queued = [c.submit(f"queued {i}", seed=20 + i, **CHEAP) for i in range(2)]
            canceled = c.submit("cancelled before the crash", **CHEAP)
            assert c.cancel(canceled).outcome == pb.CANCELLED_WHILE_QUEUED
        srv.kill9()
    finally:
        srv.close()

    again = ServerProcess(store, "--max-batch", "1")
    try:
        with Client(again.address, timeout=30) as c:
            assert c.status(done).state == pb.COMPLETED and c.result(done).seed == 5
            assert c.status(canceled).state == pb.CANCELED
            states = _finish_all(again.address, [running, *queued])
            assert set(states.values()) == {pb.COMPLETED}
            assert c.result(running).seed == 6 and [c.result(q).seed for q in queued] == [20, 21]
            logs = [line.message for line in c.status(running, logs=True).logs]
            assert any("recovered" in m for m in logs)
    finally:
        again.close()


def test_env_configuration_and_api_keys(tmp_path) -> None:
    env = {"PIXART_API_KEYS": "key-alpha-7Q,key-beta-9Z", "PIXART_MAX_QUEUE": "5"}
    srv = ServerProcess(tmp_path / "store", env=env)
    try:
        assert health(srv.address) == 1  # no key needed for health
        with Client(srv.address, key="", timeout=30) as c:
            with pytest.raises(PixArtError) as e:
                c.status("x")
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.address, key="key-beta-9Z", timeout=60) as c:
            assert c.cancel("0" * 32).outcome == pb.NOT_FOUND
            assert c.generate("env", **CHEAP).images
    finally:
        srv.signal(signal.SIGTERM)
        assert srv.wait(60) == 0
        srv.close()
    logs = srv.log_path.read_text()
    assert "key-alpha-7Q" not in logs and "key-beta-9Z" not in logs
