"""Where results are written fails: a results folder that is full or read-only (a small tmpfs this test mounts, as
root; where it cannot mount, ENOSPC/EROFS injected at the results layer of an in-process server, and the test says
which ran), and an object store that answers errors or drops connections (moto's S3 server behind a proxy this test
controls; a store that hangs is bounded the same way, by the client's timeouts, not run here for its minute).

The request ends FAILED with a clear, bounded error (UNAVAILABLE: the images were made but could not be stored), no
COMPLETED row names a missing file and nothing is left behind, the metric of failed result writes moves, and the
server goes on serving (other requests, health).
"""

from __future__ import annotations

import errno
import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos.pixart.v1 import pixart_pb2 as pb
from server.client import Client, PixArtError
from server.storage import SqliteStore
from server.storage import results as results_module
from tests.support import s3server
from tests.support.mounts import mount_tmpfs, remount, umount
from tests.support.servers import ServerProcess, ServerThread, config, health, metric, metrics_text, wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

WORK = dict(num_inference_steps=2, num_images=2, image_size=(256, 256), sync_mode=False)


def _failed_with(client: Client, rid: str, words: str) -> pb.StatusResponse:
    status = wait_for(lambda: (s := client.status(rid)).state in (pb.COMPLETED, pb.FAILED, pb.CANCELED) and s, 60)
    assert status.state == pb.FAILED, status
    assert status.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and words in status.error.message
    assert len(status.error.message) < 700
    return status


def _assert_serving_after(client: Client, address: str) -> None:
    assert client.generate("after the fault", num_inference_steps=2, image_size=(256, 256)).images
    assert health(address) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("fault", "words"), [("full", "No space left on device"),
                                              ("read-only", "Read-only file system")])
def test_a_full_or_read_only_results_folder_fails_the_request_clearly(tmp_path, monkeypatch, fault, words) -> None:
    results = tmp_path / "results"
    if mount_tmpfs(results, "64k"):  # real: a small filesystem, full after one image, or remounted read-only
        try:
            if fault == "read-only":
                remount(results, "ro")
            else:  # filled to the last block, so that even a tiny image does not fit
                with pytest.raises(OSError), open(results / "filler", "wb") as f:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            srv = ServerProcess(tmp_path / "store", "--results", str(results))
            try:
                _check_folder_fault(srv.address, srv.http_port, tmp_path / "store", results, words)
            finally:
                srv.close()
        finally:
            umount(results)
        return
    # injected: this machine cannot mount (not root, or no CAP_SYS_ADMIN): the results layer's own file operations
    # fail as that filesystem's would, so the write goes through its real error handling
    code = errno.ENOSPC if fault == "full" else errno.EROFS

    class FailingOs:
        getpid = staticmethod(os.getpid)

        @staticmethod
        def replace(src, dst):
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(results_module, "os", FailingOs)
    print("storage fault injected at the results layer (no tmpfs mount here)")
    srv = ServerThread(config(tmp_path / "store", results=str(results)))
    try:
        _check_folder_fault(srv.address, srv.http_port, tmp_path / "store", results, words)
    finally:
        srv.close()


def _check_folder_fault(address: str, http_port: int, store: Path, results: Path, words: str) -> None:
    with Client(address, timeout=60) as c:
        rid = c.submit("kept nowhere", **WORK)
        _failed_with(c, rid, words)
        with pytest.raises(PixArtError) as refused:
            c.generate("a call whose images need URLs", **WORK)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and words in str(refused.value)
        _assert_serving_after(c, address)
    assert not any(results.glob(f"{rid}/*")), "nothing of the request is left in the results folder"
    assert metric(metrics_text(http_port), "pixart_result_write_failures_total") == 2
    row = SqliteStore(store).get(rid)
    assert row.state == "FAILED" and row.result is None


class S3Proxy:
    """Loopback HTTP in front of moto's S3 server: passes requests through, or answers 500 to every PUT, or drops
    the connection of every PUT unanswered (a store that is down behind its load balancer)."""

    def __init__(self, upstream: str):
        self.mode = "pass"
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and proxy.mode == "500":
                    self._answer(500, b"<Error><Code>InternalError</Code></Error>")
                    return
                if self.command == "PUT" and proxy.mode == "down":
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{host}:{port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                self._answer(resp.status, resp.read(), resp.getheaders())
                conn.close()

            def _answer(self, status: int, data: bytes, headers=()) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.mark.parametrize("mode", ["500", "down"])
def test_an_object_store_answering_errors_or_down_fails_the_request_clearly(tmp_path, mode) -> None:
    proxy = S3Proxy(s3server.endpoint())
    bucket = s3server.new_bucket()
    srv = ServerProcess(tmp_path / "store", "--results", f"s3://{bucket}/results", "--s3-endpoint-url", proxy.url,
                        "--s3-region", s3server.REGION, env={k: v for k, v in s3server.ENV.items() if v})
    try:
        with Client(srv.address, timeout=240) as c:
            proxy.mode = mode
            rid = c.submit("kept nowhere", **WORK)
            _failed_with(c, rid, "did not take the images")
            proxy.mode = "pass"
            _assert_serving_after(c, srv.address)
            kept = c.submit("kept", **WORK)
            wait_for(lambda: c.status(kept).state == pb.COMPLETED, 60)
        objects = s3server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
        assert {o["Key"].split("/")[1] for o in objects} == {kept}, "nothing of the failed request is left"
        assert metric(metrics_text(srv.http_port), "pixart_result_write_failures_total") == 1
    finally:
        srv.close()
        proxy.server.shutdown()
