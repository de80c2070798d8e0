"""Scale-out: three `pixart serve` processes on one PostgreSQL (started by the test session) and one shared results
folder. Any replica answers for any request; a cancel sent to a replica that does not run the request stops it;
one replica killed with -9 mid-run loses nothing: its requests are claimed again once its lease runs out, each of
the 30 ends COMPLETED once, and each webhook arrives once; a replica older than the database's schema refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from protos.pixart.v1 import pixart_pb2 as pb
from server.client import Client
from server.storage import open_store
from tests.support.postgres import new_database
from tests.support.servers import ROOT, ServerProcess, export_dir, wait_for

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

REPLICAS = ("r0", "r1", "r2")
WORK = dict(num_inference_steps=12, image_size=(256, 256))  # long enough that a kill lands mid-run
TERMINAL = (pb.COMPLETED, pb.FAILED, pb.CANCELED)


class Receiver:
    """A webhook receiver on loopback: every delivery, as (Idempotency-Key, status)."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.headers["Idempotency-Key"], body["status"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    url = new_database()
    folder = tmp_path_factory.mktemp("cluster")
    receiver = Receiver()
    # one ONNX Runtime thread each, so that three replicas share the two cores without oversubscribing them
    servers = {name: ServerProcess(url, "--results", str(folder / "results"), "--replica-id", name, "--lease", "2",
                                   "--poll-interval", "0.1", "--max-batch", "1", "--intra-op-threads", "1",
                                   "--webhook-allow", "127.0.0.1/32", folder=folder)
               for name in REPLICAS}
    yield url, servers, receiver
    for srv in servers.values():
        srv.close()
    receiver.server.shutdown()


def _owner(url: str, rid: str) -> str | None:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT owner FROM requests WHERE id = %s AND state = 'IN_PROGRESS'", (rid,)).fetchone()


def test_cancel_through_a_replica_that_does_not_run_the_request(cluster) -> None:
    url, servers, _ = cluster
    with Client(servers["r0"].address, timeout=30) as c:
        rid = c.submit("cancel me elsewhere", num_inference_steps=100, num_images=8, image_size=(256, 256))
    runner = wait_for(lambda: (o := _owner(url, rid)) and o[0])
    other = next(name for name in REPLICAS if name != runner)
    with Client(servers[other].address, timeout=30) as c:
        # the progress of a request running elsewhere, as its runner publishes it
        status = wait_for(lambda: (s := c.status(rid)).progress.step >= 2 and s)
        assert status.state == pb.IN_PROGRESS and status.progress.total_steps == 100
        assert c.cancel(rid).outcome == pb.CANCELLATION_REQUESTED
        final = wait_for(lambda: (s := c.status(rid)).state in TERMINAL and s, 30)
    assert final.state == pb.CANCELED
    with Client(servers[runner].address, timeout=30) as c:
        assert c.status(rid).state == pb.CANCELED
        assert c.cancel(rid).outcome == pb.ALREADY_COMPLETED


def test_kill_9_one_of_three_loses_and_duplicates_nothing(cluster) -> None:
    url, servers, receiver = cluster
    clients = {name: Client(srv.address, timeout=30) for name, srv in servers.items()}
    try:
        ids = [clients[REPLICAS[i % 3]].submit(f"request {i}", seed=100 + i, webhook_url=receiver.url, **WORK)
               for i in range(30)]
        victim = servers["r1"]

        def r1_runs() -> bool:
            with psycopg.connect(url) as conn:
                return conn.execute("SELECT count(*) FROM requests WHERE owner = 'r1' AND state = 'IN_PROGRESS' "
                                    "AND finished IS NULL").fetchone()[0] > 0

        wait_for(r1_runs, 60, 0.01)
        victim.kill9()
        live = [clients["r0"], clients["r2"]]
        # status and result through a replica other than the one each was submitted to
        wait_for(lambda: all(live[i % 2].status(rid).state in TERMINAL for i, rid in enumerate(ids)), 300, 0.5)
        states = [live[(i + 1) % 2].status(rid).state for i, rid in enumerate(ids)]
        assert states == [pb.COMPLETED] * 30
        seeds = [live[i % 2].result(rid).seed for i, rid in enumerate(ids)]
        assert seeds == [100 + i for i in range(30)]
        wait_for(lambda: len(receiver.received) >= 30, 60)
    finally:
        for c in clients.values():
            c.close()
    with psycopg.connect(url) as conn:
        rerun = conn.execute("SELECT count(*) FROM requests WHERE attempt > 1").fetchone()[0]
    assert rerun >= 1  # the kill did land mid-run: some request was claimed again
    # each completion recorded once: one "ended" line per request across all three replicas' logs
    ended = Counter()
    for srv in servers.values():
        for line in srv.log_path.read_text().splitlines():
            if line.startswith("{") and (record := json.loads(line)).get("msg") == "ended":
                ended[record["request_id"]] += 1
    assert {rid: ended[rid] for rid in ids} == {rid: 1 for rid in ids}
    counts = Counter(key for key, _ in receiver.received)
    assert {rid: counts[rid] for rid in ids} == {rid: 1 for rid in ids}
    assert {status for _, status in receiver.received} == {"COMPLETED"}


def test_a_replica_older_than_the_schema_refuses_clearly(tmp_path) -> None:
    url = new_database()
    open_store(url, tmp_path / "results").close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pixart_schema SET version = version + 1")  # a newer server migrated it
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--engine", str(export_dir()), "--store", url,
         "--results", str(tmp_path / "results"), "--port", "0", "--http-port", "off", "--no-warmup"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "newer than this server's" in out.stderr and "Traceback" not in out.stderr


def test_the_scale_out_benchmark_runs_and_reports(tmp_path) -> None:
    """The harness behind the README's scale-out figures, on a tiny load (no figure is asserted)."""
    pytest.importorskip("pgserver")
    from benchmarks import replicas

    assert replicas.main(["--engine", str(export_dir()), "--replicas", "1", "--requests", "2", "--steps", "1",
                          "--calls", "5", "--claim-rows", "10", "--claimers", "2", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "replicas.json").read_text())
    assert [r["replicas"] for r in report["throughput"]] == [1] and report["throughput"][0]["requests_per_s"] > 0
    assert set(report["store_overhead"]) == {"sqlite", "postgresql"} and report["claims"]["claims_per_s"] > 0
    assert "requests/s" in (tmp_path / "replicas.md").read_text()
