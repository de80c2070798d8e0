"""The HTTP port held to the gRPC port's guarantees (issue: "The HTTP port, hardened like the gRPC port"): each
finding of the independent read reproduced here against a real server on loopback (its engine the counting
stand-in: what is tested is the port), then fixed at its mechanism.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import grpc
import pytest
import uvicorn
from uvicorn.server import ServerState

from server.api.http.guard import ConnectionGuard, ConnectionLimits
from server.api.http.server import build_app
from server.api.keys import ApiKeys
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
