"""The HTTP port held to the gRPC port's guarantees (issue: "The HTTP port, hardened like the gRPC port"): each
finding of the independent read reproduced here against a real server on loopback (its engine the counting
stand-in: what is tested is the port), then fixed at its mechanism.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import uvicorn
from uvicorn.server import ServerState

from protos.pixart.v1 import pixart_pb2 as pb
from server import webhooks
from server.api.http.guard import ConnectionGuard, ConnectionLimits
from server.api.http.server import build_app
from server.api.keys import ApiKeys
from server.client import Client, PixArtError
from server.core.deliveries import WebhookDeliveries
from server.storage import Row
from server.webhooks import Delivery, WebhookPolicy, WebhookSender
from tests.support.fakes import FakeEngine
from tests.support.servers import ServerThread, config, metric, metrics_text, wait_for

APP = "fal-ai/pixart-sigma"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("store"), http_max_connections_per_address=6, http_header_timeout_s=1.0,
                 http_body_timeout_s=1.0, http_write_timeout_s=1.0)
    srv = ServerThread(cfg, engine=FakeEngine(step_delay=0.02))
    yield srv
    srv.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (EOF, or a reset) within `seconds`, reading whatever it answers first."""
    end = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < end:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def _answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response read off `sock`: (head, body), the body by its content-length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    fields = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def _trickle(sock: socket.socket, lines: list[bytes], every_s: float) -> int:
    """Send one line every `every_s` until the server closes the connection; how many were sent."""
    for sent, line in enumerate(lines):
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            return sent
        if _closed_within(sock, every_s):
            return sent + 1
    return len(lines)


# -- 1. connections and time ----------------------------------------------------------------------------------------
def test_headers_trickled_a_line_at_a_time_are_cut_off(server) -> None:
    """Before: uvicorn's keep-alive timer restarted on every byte, so a header line every few seconds held the
    connection (and its file descriptor) forever. Now the headers must be complete within --http-header-timeout."""
    before = metric(metrics_text(server.http_port), "pixart_http_connections_cut_total", reason="slow_headers")
    with _connect(server.http_port) as sock:
        lines = [b"GET /healthz HTTP/1.1\r\n"] + [f"x-pad-{i}: a\r\n".encode() for i in range(40)]
        sent = _trickle(sock, lines, every_s=0.2)  # 41 lines over 8 s if nothing cut it off
    assert sent < 15, f"the connection was still open after {sent} lines"
    after = metric(metrics_text(server.http_port), "pixart_http_connections_cut_total", reason="slow_headers")
    assert after == before + 1


def test_a_body_trickled_a_byte_at_a_time_is_cut_off(server) -> None:
    with _connect(server.http_port) as sock:
        sock.sendall(f"POST /queue/{APP} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: 200\r\n\r\n".encode())
        sent = _trickle(sock, [b" "] * 40, every_s=0.2)
    assert sent < 15, f"the connection was still open after {sent} body bytes"


def test_a_client_address_gets_a_bounded_number_of_connections(server) -> None:
    """Before: no bound, so one address could take every file descriptor the process has, and gRPC accepts, result
    writes and store reconnects failed with it. Now past --http-max-connections-per-address a connection is
    answered 503 with Retry-After and closed before anything is read; the others keep working."""
    held = [_connect(server.http_port) for _ in range(6)]
    try:
        for sock in held:  # each is admitted (and then waits for its headers)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        with _connect(server.http_port) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in answer.lower()
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: server.app.http.guard.total == 0, timeout=10)
    with _connect(server.http_port) as again:  # the slots are free again once those closed
        again.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_response_the_client_does_not_read_is_abandoned() -> None:
    """A client that stops reading fills the write buffer (uvicorn pauses writing): after --http-write-timeout the
    connection is closed instead of holding the response, and its memory, forever. Driven at the protocol, since
    loopback's socket buffers take megabytes before the server sees a slow reader."""

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.closed = False

        def get_extra_info(self, name, default=None):
            return {"peername": ("10.0.0.9", 5555), "sockname": ("127.0.0.1", 80)}.get(name, default)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        def write(self, data) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def scenario() -> tuple[bool, bool]:
        guard = ConnectionGuard(ConnectionLimits(8, 8, header_timeout_s=30, body_timeout_s=30, write_timeout_s=0.2))
        app = build_app(keys=ApiKeys(), healthy=lambda: True)
        quiet = uvicorn.Config(app, log_config=None, access_log=False)
        protocol = guard.protocol()(config=quiet, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        protocol.pause_writing()  # the buffer is full: the client is not reading
        await asyncio.sleep(0.05)
        early = transport.closed
        await asyncio.sleep(0.4)
        return early, transport.closed

    early, late = asyncio.run(scenario())
    assert (early, late) == (False, True)


# -- 4. hostile input answers 4xx -------------------------------------------------------------------------------------
def test_a_deeply_nested_body_is_422_not_500(server) -> None:
    """Before: RecursionError from the JSON parser, a 500 with a traceback in the log."""
    body = b"[" * 100_000 + b"]" * 100_000
    with _connect(server.http_port) as sock:
        sock.sendall(f"POST /queue/{APP} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        head, body = _answer(sock)
    assert head.startswith(b"HTTP/1.1 422")
    assert json.loads(body)["detail"][0]["msg"] == "is nested too deeply"


# -- 5. metric labels -----------------------------------------------------------------------------------------------
def test_made_up_grpc_method_names_share_one_metric_label(server) -> None:
    """Before: each unknown method name, which needs no key to reach the interceptors, made a new
    pixart_requests{method=...} series forever."""
    with grpc.insecure_channel(server.address) as channel:
        for i in range(30):
            call = channel.unary_unary(f"/pixart.v1.PixArt/MadeUp{i}")
            with pytest.raises(grpc.RpcError):
                call(b"", timeout=5)
    text = metrics_text(server.http_port)
    assert "MadeUp" not in text
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("pixart_requests_total{")}
    assert methods <= {"Generate", "GenerateStream", "Submit", "Status", "Result", "Cancel", "Check", "Watch", "other"}


# -- 9. /run stops when its caller goes away ------------------------------------------------------------------------
def test_run_is_cancelled_when_its_caller_disconnects(server) -> None:
    """Before: the handler awaited the outcome and uvicorn does not cancel a handler whose client left, so the
    request ran to its end (the comment said otherwise). Now the disconnect cancels it at its next step."""
    engine: FakeEngine = server.app.loop.engine._engine
    body = json.dumps({"prompt": "left alone", "num_inference_steps": 100}).encode()
    before = len(engine.steps)
    with _connect(server.http_port) as sock:
        sock.sendall(f"POST /run/{APP} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: len(engine.steps) > before + 3, timeout=10)  # it is running
    server.wait_idle(timeout=10)
    steps = sum(1 for batch in engine.steps[before:] if "left alone" in batch)
    assert steps < 100, "the request ran to its end after its caller left"
    text = metrics_text(server.http_port)
    assert metric(text, "pixart_request_outcomes_total", state="CANCELED") >= 1


# -- 7. requests belong to the key that submitted them -----------------------------------------------------------------
def _get(port: int, path: str, key: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     headers={"Authorization": f"Key {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def test_another_tenants_request_is_unknown_on_every_route_and_replica(tmp_path) -> None:
    """Before: any key could read, follow, cancel or fetch the images of any request id. Now a key sees its own
    tenant's requests only, on gRPC and fal's routes, on the replica that ran it and on another one; an admin key
    sees all; a signed result URL still opens its one file for whoever holds it."""
    keys = tmp_path / "keys"
    keys.write_text("alice k-alice\nbob k-bob\nops k-ops admin\n")
    replicas = [ServerThread(config(tmp_path / "store", api_keys_file=str(keys), replica_id=name),
                             engine=FakeEngine()) for name in ("a", "b")]
    try:
        a, b = replicas
        body = json.dumps({"prompt": "alice's", "num_inference_steps": 2}).encode()
        submit = urllib.request.Request(f"http://127.0.0.1:{a.http_port}/queue/{APP}", data=body,
                                        headers={"Authorization": "Key k-alice", "Content-Type": "application/json"})
        with urllib.request.urlopen(submit, timeout=10) as answer:
            rid = json.loads(answer.read())["request_id"]
        done = f"/queue/{APP}/requests/{rid}"
        wait_for(lambda: _get(a.http_port, f"{done}/status", "k-alice")[0] == 200, timeout=20)
        image = json.loads(_get(a.http_port, done, "k-alice")[1])["images"][0]["url"]
        signed = image.split(str(a.http_port), 1)[1]
        for srv in replicas:
            port = srv.http_port
            for path, method in ((f"{done}/status", "GET"), (done, "GET"), (f"{done}/status/stream", "GET"),
                                 (f"{done}/cancel", "PUT")):
                assert _get(port, path, "k-bob", method)[0] == 404, (srv.app.replica_name, path)
            assert _get(port, f"/results/{rid}/image_0.png", "k-bob")[0] == 404  # a key, not a signature
            assert _get(port, f"/results/{rid}/image_0.png", "k-alice")[0] == 200
            assert _get(port, f"{done}/status", "k-alice")[0] == 200 and _get(port, done, "k-ops")[0] == 200
            assert _get(port, signed.split("?")[0] + "?" + signed.split("?")[1], "k-bob")[0] == 200  # signed
            with Client(srv.address, key="k-bob", timeout=10) as bob:
                for call in (bob.status, bob.result):
                    with pytest.raises(PixArtError) as unknown:
                        call(rid)
                    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
                assert bob.cancel(rid).outcome == pb.NOT_FOUND
            with Client(srv.address, key="k-ops", timeout=10) as ops:
                assert ops.status(rid).state == pb.COMPLETED
    finally:
        for srv in replicas:
            srv.close()


# -- 6. webhook deliveries are bounded --------------------------------------------------------------------------------
class _Dripping:
    """A webhook receiver that reads the POST, then answers one byte every `every_s` seconds."""

    def __init__(self, every_s: float):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.every_s = self.listener.getsockname()[1], every_s
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)
            try:
                for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n":
                    conn.sendall(bytes([byte]))
                    time.sleep(self.every_s)
            except OSError:
                return


def test_a_webhook_receiver_dripping_its_answer_is_cut_off_at_the_attempts_deadline() -> None:
    """Before: the timeout applied to each socket operation, so a byte every 9 s held a delivery thread for days
    (and outlived the delivery's claim, so another replica delivered it again)."""
    receiver = _Dripping(every_s=0.3)  # 38 bytes: 11 s if nothing cuts it off
    sender = WebhookSender(WebhookPolicy(["127.0.0.0/8"]), b"secret", timeout_s=1.0, attempts=1)
    started = time.monotonic()
    delivered = asyncio.run(sender.deliver(Delivery("ab" * 16, f"http://127.0.0.1:{receiver.port}/hook", b"{}")))
    took = time.monotonic() - started
    assert not delivered and took < 6, f"the attempt took {took:.1f} s"


def test_a_resolver_that_hangs_fails_the_attempt_instead_of_holding_it(monkeypatch) -> None:
    def hanging(*_args, **_kwargs):
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", hanging)
    monkeypatch.setattr(webhooks, "RESOLVE_TIMEOUT_S", 0.2)
    with pytest.raises(OSError, match="resolving the host took more than"):
        WebhookPolicy().destination("https://hooks.example.com/x")


def test_a_webhook_body_too_large_leaves_its_images_out(tmp_path) -> None:
    """A sync_mode result carries its images as data (up to ~130 MB): such a body is neither built whole on the
    event loop nor held across retries; past 16 MB the receiver gets the outcome and fetches the images."""
    big = {"request_id": "r", "status": "OK", "payload": {"images": [{"url": "data:," + "A" * (17 << 20)}],
                                                          "seed": 1}, "error": None}
    deliveries = WebhookDeliveries(None, WebhookSender(WebhookPolicy(), b"s"), None, replica="a",
                                   payloads={"fal": lambda row: copy.deepcopy(big)})
    body = json.loads(deliveries.body(Row("r", "COMPLETED", True, b"", "https://x.example/", False, 0, None, None,
                                          None, None, [], origin="fal")))
    assert body["payload"]["images"] == [] and "fetch the result" in body["payload"]["images_omitted"]
    assert body["payload"]["seed"] == 1 and body["status"] == "OK"


# -- 2. status streams: woken by events, bounded per key --------------------------------------------------------------
def _open_stream(port: int, rid: str, key: str | None = None) -> tuple[socket.socket, bytes]:
    sock = _connect(port)
    auth = f"authorization: Key {key}\r\n" if key else ""
    sock.sendall(f"GET /queue/{APP}/requests/{rid}/status/stream HTTP/1.1\r\nhost: x\r\n{auth}\r\n".encode())
    return sock, sock.recv(4096)


def test_status_streams_are_bounded_per_key_and_woken_by_events_not_polling(tmp_path) -> None:
    """Before: every stream read the store every 100 ms on its own, so 2,000 streams from one key starved the
    lease renewals. Now a key holds at most --http-max-streams-per-key open streams (429 past it), and a stream
    of a request live on this replica is woken by its events: it does not read the store while it runs."""
    srv = ServerThread(config(tmp_path / "store", http_max_streams_per_key=2), engine=FakeEngine(step_delay=0.05))
    try:
        body = json.dumps({"prompt": "followed", "num_inference_steps": 40}).encode()
        submit = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/queue/{APP}", data=body,
                                        headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(submit, timeout=10) as answer:
            rid = json.loads(answer.read())["request_id"]
        wait_for(lambda: _get(srv.http_port, f"/queue/{APP}/requests/{rid}/status", "")[1].find(b"IN_PROGRESS") > 0,
                 timeout=10)
        reads = []
        real_get = srv.app.store.get
        srv.app.store.get = lambda request_id: reads.append(request_id) or real_get(request_id)
        first, head = _open_stream(srv.http_port, rid)
        second, _ = _open_stream(srv.http_port, rid)
        third, refused = _open_stream(srv.http_port, rid)
        assert head.startswith(b"HTTP/1.1 200") and refused.startswith(b"HTTP/1.1 429")
        assert b"retry-after" in refused.lower()
        for sock in (first, second):  # both follow it to its end: events, not reads
            data = head if sock is first else b""
            while b'"status": "COMPLETED"' not in data:
                data += sock.recv(65536)
        assert len(reads) <= 4, f"{len(reads)} store reads while following a request that ran here"
        for sock in (first, second, third):
            sock.close()
        wait_for(lambda: not srv.app.fal._streams, timeout=10)  # their places are given back
    finally:
        srv.close()
