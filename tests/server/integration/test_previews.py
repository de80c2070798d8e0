"""Previews reach callers on every stream: gRPC GenerateStream's Preview events, fal's status stream (an extension
field fal's clients ignore), and OpenAI's partial images (tests/acceptance/test_openai.py). The engine is the real
default export's, so the pictures are the engine's previews (tests/engine/test_preview.py checks what they show)."""

from __future__ import annotations

import io
import json
import socket
import urllib.request

import pytest
from PIL import Image

from server.client import Client
from tests.support.servers import ServerThread, config

APP = "fal-ai/pixart-sigma"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(config(tmp_path_factory.mktemp("store")))
    yield srv
    srv.close()


def test_generate_stream_sends_a_preview_every_k_steps(server) -> None:
    with Client(server.address, timeout=120) as client:
        events = list(client.stream("a red circle", num_inference_steps=6, image_size=(256, 256), preview_every=2))
    previews = [e.preview for e in events if e.WhichOneof("event") == "preview"]
    assert [(p.step, p.total_steps) for p in previews] == [(2, 6), (4, 6)] and previews[0].content_type == "image/jpeg"
    assert Image.open(io.BytesIO(previews[0].data)).format == "JPEG"
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.index("preview") > kinds.index("progress") and kinds[-1] == "result"


def test_fals_status_stream_carries_the_latest_preview(server) -> None:
    body = json.dumps({"prompt": "a blue square", "num_inference_steps": 30, "preview_every": 5,
                       "image_size": {"width": 256, "height": 256}}).encode()
    submit = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/queue/{APP}", data=body,
                                    headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(submit, timeout=30) as answer:
        rid = json.loads(answer.read())["request_id"]
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=120) as sock:
        sock.sendall(f"GET /queue/{APP}/requests/{rid}/status/stream HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        data = b""
        while b'"status": "COMPLETED"' not in data:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended before COMPLETED"
            data += chunk
    statuses = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]
    shown = [s["preview"] for s in statuses if s.get("preview")]
    assert shown and all(p["url"].startswith("data:image/jpeg;base64,") for p in shown)
    steps = [p["step"] for p in shown]  # each preview once, in order, at multiples of preview_every
    assert steps == sorted(set(steps)) and all(step % 5 == 0 for step in steps)
