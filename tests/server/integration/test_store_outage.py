"""The database goes away under two running `pixart serve` replicas: PostgreSQL (a server of the test's own) stopped
in immediate mode while requests run, kept down, started again; then its connections killed server-side.

While it is down health says NOT_SERVING, and Submit, Status and Cancel answer promptly (UNAVAILABLE, or what the
replica itself knows), never hang or answer UNKNOWN/INTERNAL, and a refused Submit leaves nothing that runs later;
fal's routes answer 503 with Retry-After. Once it is back, health says SERVING again, Submit works at once, and
every request accepted before the outage ends COMPLETED exactly once, with one webhook.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2

from protos.pixart.v1 import pixart_pb2 as pb
from server.client import Client, PixArtError
from tests.server.integration.test_replicas import TERMINAL, Receiver
from tests.support.postgres import OwnServer
from tests.support.servers import ServerProcess, health, wait_for

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

ACCEPTED = 10
WORK = dict(num_inference_steps=100, num_images=4, image_size=(256, 256))  # ~1 s each: some run when it stops
PROMPT_S = 8.0  # "promptly": the deadline these calls get; the pool's checkout timeout (5 s) is well inside it
DOWN_S = 10.0


@pytest.fixture
def database():
    server = OwnServer()
    yield server
    server.close()


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except PixArtError as exc:
        return exc.code
    return grpc.StatusCode.OK


def _fal_submit(http_port: int) -> tuple[int, dict[str, str]]:
    """(status, headers with lowercase names)."""
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/queue/fal-ai/pixart-sigma",
                                     data=json.dumps({"prompt": "during the outage"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def _rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]


def test_a_database_outage_loses_nothing_and_hangs_nothing(database, tmp_path) -> None:
    receiver = Receiver()
    replicas = [ServerProcess(database.url, "--results", str(tmp_path / "results"), "--replica-id", name,
                              "--lease", "3", "--poll-interval", "0.1", "--max-batch", "1", "--intra-op-threads", "1",
                              "--webhook-allow", "127.0.0.1/32", folder=tmp_path)
                for name in ("a", "b")]
    clients = [Client(srv.address, timeout=30) for srv in replicas]
    try:
        ids = [clients[i % 2].submit(f"request {i}", seed=i, webhook_url=receiver.url, **WORK)
               for i in range(ACCEPTED)]

        def running() -> bool:
            with psycopg.connect(database.url) as conn:
                return conn.execute("SELECT count(*) FROM requests WHERE state = 'IN_PROGRESS'").fetchone()[0] > 0

        wait_for(running, 60, 0.01)
        database.stop_immediately()
        down_at = time.monotonic()

        # each call gets a deadline of PROMPT_S: hanging would end DEADLINE_EXCEEDED, not UNAVAILABLE
        assert _code(lambda: clients[0].submit("refused while down", timeout=PROMPT_S, **WORK)) \
            == grpc.StatusCode.UNAVAILABLE
        for rid in ids[:3]:  # what this replica knows, or UNAVAILABLE: never UNKNOWN, never a hang
            assert _code(lambda rid=rid: clients[1].status(rid, timeout=PROMPT_S)) in (grpc.StatusCode.OK,
                                                                                     grpc.StatusCode.UNAVAILABLE)
        # a cancel is acknowledged only once committed: refused now, so the request still completes
        assert _code(lambda: clients[0].cancel(ids[-1], timeout=PROMPT_S)) == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: all(health(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING
                             for srv in replicas), PROMPT_S)
        status, headers = _fal_submit(replicas[1].http_port)
        assert status == 503 and int(headers["retry-after"]) > 0
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - down_at)))

        database.start()
        wait_for(lambda: all(health(srv.address) == health_pb2.HealthCheckResponse.SERVING for srv in replicas), 30)
        # the first Submit after the restart goes through at once (it took 11 s when stale pooled connections failed)
        assert _code(lambda: clients[0].submit("after the restart", num_inference_steps=2, timeout=PROMPT_S)) \
            == grpc.StatusCode.OK
        assert database.terminate_connections() >= 1
        assert _code(lambda: clients[1].submit("after the connections were killed", num_inference_steps=2)) \
            == grpc.StatusCode.OK

        wait_for(lambda: all(clients[i % 2].status(rid).state in TERMINAL for i, rid in enumerate(ids)), 240, 0.5)
        assert [clients[i % 2].status(rid).state for i, rid in enumerate(ids)] == [pb.COMPLETED] * ACCEPTED
        assert [clients[i % 2].result(rid).seed for i, rid in enumerate(ids)] == list(range(ACCEPTED))
        wait_for(lambda: len(receiver.received) >= ACCEPTED, 60)
        time.sleep(2)  # a duplicate delivery would arrive by now
    finally:
        for c in clients:
            c.close()
        for srv in replicas:
            srv.close()
        receiver.server.shutdown()
    counts = Counter(key for key, _ in receiver.received)
    assert {rid: counts[rid] for rid in ids} == {rid: 1 for rid in ids}
    assert _rows(database.url) == ACCEPTED + 2  # the Submit refused during the outage left no row behind
    ended = Counter()
    for srv in replicas:
        for line in srv.log_path.read_text().splitlines():
            if line.startswith("{") and (record := json.loads(line)).get("msg") == "ended":
                ended[record["request_id"]] += 1
    assert {rid: ended[rid] for rid in ids} == {rid: 1 for rid in ids}
