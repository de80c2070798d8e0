"""The gRPC service against real servers on loopback, with the real engine on the embedded default model.

Requests are cheap (2 steps, 256x256) except where a test needs work that is still running when it acts.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc
from server.client import AsyncClient, Client, PixArtError
from tests.support.servers import (
    ServerThread,
    config,
    health,
    metric,
    metrics_text,
    shared_engine,
    wait_for,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CHEAP = dict(num_inference_steps=2, image_size=(256, 256))
# the most work one request can ask of the default model (~2 s here): acted on while it runs
SLOW = dict(num_inference_steps=100, image_size=(256, 256), num_images=8)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # max_wait lets concurrent callers meet in one batch; max_queue is above the 32-client test. Batches stay
    # at 2: the VAE decodes a batch at once and its mid-block attention at 1024x1024 is ~2.5 GB per image.
    cfg = config(tmp_path_factory.mktemp("store"), max_batch=2, max_batch_images=2, max_wait_ms=200, max_queue=48,
                 webhook_allow=["127.0.0.0/8"])  # the test's webhook receiver listens on loopback
    srv = ServerThread(cfg)
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- basic calls -------------------------------------------------------------------------------------------------
def test_health_and_reflection(server) -> None:
    assert health(server.address) == SERVING
    assert health(server.address, "pixart.v1.PixArt") == SERVING
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"pixart.v1.PixArt", "grpc.health.v1.Health"} <= names


def test_generate_unary(client) -> None:
    r = client.generate("a red fox in the snow", seed=42, **CHEAP)
    assert r.seed == 42 and r.prompt == "a red fox in the snow" and r.request_id
    assert len(r.images) == 1 and list(r.has_nsfw_concepts) == [False]
    img = r.images[0]
    assert (img.width, img.height) == (256, 256) and img.content_type == "image/png"
    assert img.file_size == len(img.file_data) and not img.url
    assert _pixels(img.file_data).shape == (256, 256, 3)
    t = r.timings
    assert t.queue >= 0 and t.denoising > 0 and t.total >= t.denoising
    # same seed and inputs, same pixels; a random seed is reported: it is the one used, and a fresh one each time
    assert client.generate("a red fox in the snow", seed=42, **CHEAP).images[0].file_data == img.file_data
    drawn = client.generate("a red fox", num_images=2, output_format="jpeg", **CHEAP)
    again = client.generate("a red fox", num_images=2, output_format="jpeg", seed=drawn.seed, **CHEAP)
    assert [i.file_data for i in again.images] == [i.file_data for i in drawn.images]
    assert client.generate("a red fox", **CHEAP).seed != drawn.seed


def test_stream_event_order(client) -> None:
    events = list(client.stream("a lighthouse", seed=7, **CHEAP))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "result"
    assert set(kinds[1:-1]) <= {"queued", "progress", "log"} and "log" in kinds
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    assert steps == [1, 2] and all(e.progress.total_steps == 2 for e in events if e.HasField("progress"))
    # progress only after leaving the queue
    assert max(i for i, k in enumerate(kinds) if k == "queued") < kinds.index("progress")
    assert len({e.request_id for e in events}) == 1
    assert events[-1].result.seed == 7


def test_submit_status_result(client, server) -> None:
    rid = client.submit("a cat", seed=3, **CHEAP)
    assert len(rid) == 32
    status = wait_for(lambda: (s := client.status(rid, logs=True)).state in (pb.COMPLETED, pb.FAILED) and s)
    assert status.state == pb.COMPLETED and any("completed" in line.message for line in status.logs)
    r = client.result(rid)
    assert r.request_id == rid and r.seed == 3 and r.images[0].file_data
    # the unary call with the same seed gives the same pixels
    assert client.generate("a cat", seed=3, **CHEAP).images[0].file_data == r.images[0].file_data
    assert client.cancel(rid).outcome == pb.ALREADY_COMPLETED


def test_sync_mode_false_returns_urls_served_over_http(client) -> None:
    rid = client.submit("a boat", sync_mode=False, **CHEAP)
    wait_for(lambda: client.status(rid).state == pb.COMPLETED)
    for r in (client.generate("a boat", sync_mode=False, num_images=2, **CHEAP), client.result(rid)):
        assert r.images and all(not img.file_data and img.url.startswith("http://127.0.0.1:") for img in r.images)
        for img in r.images:
            with urllib.request.urlopen(img.url, timeout=10) as resp:
                data = resp.read()
            assert len(data) == img.file_size and _pixels(data).shape == (img.height, img.width, 3)


def test_unknown_ids(client) -> None:
    for call in (client.status, client.result):
        with pytest.raises(PixArtError) as e:
            call("0" * 32)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert client.cancel("0" * 32).outcome == pb.NOT_FOUND


def test_async_client_and_subscribe(server) -> None:
    import asyncio

    async def main() -> tuple:
        async with AsyncClient(server.address) as c:
            updates: list = []
            r = await c.subscribe("a tree", seed=5, on_update=updates.append, with_logs=True, **CHEAP)
            events = [e async for e in c.stream("a tree", seed=5, **CHEAP)]
            unary = await c.generate("a tree", seed=5, **CHEAP)
            return r, updates, events, unary

    r, updates, events, unary = asyncio.run(main())
    assert updates[-1].state == pb.COMPLETED
    assert r.images[0].file_data == events[-1].result.images[0].file_data == unary.images[0].file_data


def test_cli_generate(server, tmp_path) -> None:
    from server.cli import main

    out = tmp_path / "fox.png"
    rc = main(["generate", "a fox", "--address", server.address, "--steps", "2", "--image-size", "256x256",
               "--seed", "1", "--out", str(out)])
    assert rc == 0 and _pixels(out.read_bytes()).shape == (256, 256, 3)


# -- validation --------------------------------------------------------------------------------------------------
def _bad_cases() -> list[tuple[dict, str | list[str]]]:
    cases: list[tuple[dict, str | list[str]]] = [
        (dict(prompt=""), "prompt"),
        (dict(prompt="   \n"), "prompt"),
        (dict(prompt="x" * 10_001), "prompt"),
        (dict(negative_prompt="x" * 10_001), "negative_prompt"),
        (dict(style=99), "style"),
        (dict(image_size_preset=99), "image_size"),
        (dict(image_size_custom=pb.ImageSize(width=255, height=512)), "image_size.width"),
        (dict(image_size_custom=pb.ImageSize(width=512, height=2049)), "image_size.height"),
        (dict(image_size_custom=pb.ImageSize(width=512)), "image_size.height"),
        (dict(image_size_custom=pb.ImageSize()), ["image_size.width", "image_size.height"]),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=101), "num_inference_steps"),
        (dict(scheduler=9), "scheduler"),
        (dict(guidance_scale=-0.5), "guidance_scale"),
        (dict(guidance_scale=20.01), "guidance_scale"),
        (dict(guidance_scale=math.nan), "guidance_scale"),
        (dict(guidance_scale=math.inf), "guidance_scale"),
        (dict(seed=-1), "seed"),
        (dict(num_images=0), "num_images"),
        (dict(num_images=9), "num_images"),
        (dict(output_format=9), "output_format"),
        (dict(step_cache=9), "step_cache"),
    ]
    return cases


@pytest.mark.parametrize(("fields", "field"), _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_bad_field_is_named(client, fields, field) -> None:
    msg = pb.GenerateRequest(**{"prompt": "ok", "num_inference_steps": 2, **fields})
    for call in (client.generate, lambda m: list(client.stream(m)), client.submit):
        with pytest.raises(PixArtError) as e:
            call(msg)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in e.value.violations] == ([field] if isinstance(field, str) else field)
        assert e.value.violations[0][1]  # the rule is spelled out


def test_safety_checker_flags_reach_the_client(client) -> None:
    plain = client.generate("a", seed=3, num_images=2, **CHEAP)
    checked = client.generate("a", seed=3, num_images=2, enable_safety_checker=True, **CHEAP)
    expected = shared_engine().safety_checker.check(np.stack([_pixels(im.file_data) for im in plain.images]))
    assert list(plain.has_nsfw_concepts) == [False, False]
    assert list(checked.has_nsfw_concepts) == list(expected)
    for flagged, im in zip(expected, checked.images, strict=True):
        assert (not _pixels(im.file_data).any()) == flagged


def test_all_bad_fields_at_once_and_webhook_url(client) -> None:
    msg = pb.GenerateRequest(prompt="", num_inference_steps=0, num_images=9, guidance_scale=-1)
    with pytest.raises(PixArtError) as e:
        client.generate(msg)
    assert {f for f, _ in e.value.violations} == {"prompt", "num_inference_steps", "num_images", "guidance_scale"}
    for url in ("not a url", "ftp://example.com/hook", "http://", "http://host:port/"):
        with pytest.raises(PixArtError) as e:
            client.submit("ok", webhook_url=url, **CHEAP)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.violations[0][0] == "webhook_url"


def test_bad_requests_are_counted_in_metrics(server, client) -> None:
    before = metric(metrics_text(server.http_port), "pixart_requests_total", method="Generate",
                    code="INVALID_ARGUMENT")
    with pytest.raises(PixArtError):
        client.generate("", **CHEAP)

    def counted() -> float:  # the count lands as the call ends, possibly just after the client has its answer
        return metric(metrics_text(server.http_port), "pixart_requests_total", method="Generate",
                      code="INVALID_ARGUMENT")

    wait_for(lambda: counted() >= before + 1, 5)
    assert counted() == before + 1


# -- queue, cancellation, deadlines ------------------------------------------------------------------------------
def test_queue_full_and_cancel_queued_and_running(tmp_path) -> None:
    srv = ServerThread(config(tmp_path / "store", max_queue=1, max_batch=1))  # no room to join: "next" waits
    try:
        with Client(srv.address, timeout=60) as c:
            running = c.submit("long", **SLOW)
            wait_for(lambda: c.status(running).state == pb.IN_PROGRESS and c.status(running).progress.step >= 1)
            queued = c.submit("next", **CHEAP)
            st = c.status(queued)
            assert st.state == pb.IN_QUEUE and st.queue_position == 0
            for call in (lambda: c.submit("one more", **CHEAP), lambda: c.generate("one more", **CHEAP),
                         lambda: list(c.stream("one more", **CHEAP))):
                with pytest.raises(PixArtError) as e:
                    call()
                assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            r = c.cancel(queued)
            assert (r.outcome, r.state) == (pb.CANCELLED_WHILE_QUEUED, pb.CANCELED)
            assert c.status(queued).state == pb.CANCELED
            r = c.cancel(running)
            assert r.outcome == pb.CANCELLATION_REQUESTED
            final = wait_for(lambda: (s := c.status(running)).state in (pb.CANCELED, pb.COMPLETED) and s, 30)
            assert final.state == pb.CANCELED and final.error.code == grpc.StatusCode.CANCELLED.value[0]
            with pytest.raises(PixArtError) as e:
                c.result(running)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            srv.wait_idle(10)
            assert c.cancel(running).outcome == pb.ALREADY_COMPLETED
            # the place is free again
            assert c.generate("after", **CHEAP).images
    finally:
        srv.close()


def test_client_cancel_of_a_stream_stops_the_work(server, client) -> None:
    server.wait_idle()
    before = metric(metrics_text(server.http_port), "pixart_request_outcomes_total", state="CANCELED")
    with grpc.insecure_channel(server.address) as ch:
        call = pb_grpc.PixArtStub(ch).GenerateStream(pb.GenerateRequest(
            prompt="long", num_inference_steps=100, num_images=8,
            image_size_custom=pb.ImageSize(width=256, height=256)))
        for event in call:
            if event.HasField("progress"):
                break
        t0 = time.monotonic()
        call.cancel()
    server.wait_idle(30)
    assert time.monotonic() - t0 < 20  # stopped at a step, not after 100 of them
    after = metric(metrics_text(server.http_port), "pixart_request_outcomes_total", state="CANCELED")
    assert after == before + 1


def test_deadline_stops_the_work(server, client) -> None:
    server.wait_idle()
    with pytest.raises(PixArtError) as e:
        client.generate("long", timeout=0.5, **SLOW)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    t0 = time.monotonic()
    server.wait_idle(30)
    assert time.monotonic() - t0 < 20


# -- batching and load -------------------------------------------------------------------------------------------
def test_batching_batches_and_gives_the_same_pixels(server) -> None:
    server.wait_idle()
    text = metrics_text(server.http_port)
    count0, sum0 = metric(text, "pixart_batch_size_count"), metric(text, "pixart_batch_size_sum")
    prompts = [f"a house number {i}" for i in range(4)]
    barrier = threading.Barrier(4)

    def call(i: int) -> bytes:
        with Client(server.address, timeout=120) as c:
            barrier.wait()
            return c.generate(prompts[i], seed=100 + i, **CHEAP).images[0].file_data

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(call, range(4)))
    text = metrics_text(server.http_port)
    count1, sum1 = metric(text, "pixart_batch_size_count"), metric(text, "pixart_batch_size_sum")
    steps = 4 * CHEAP["num_inference_steps"]  # request-steps run: each observation is one step's requests
    assert sum1 - sum0 == steps and count1 - count0 < steps, "some of the four requests shared an engine step"
    with Client(server.address, timeout=120) as c:
        alone = [c.generate(prompts[i], seed=100 + i, **CHEAP).images[0].file_data for i in range(4)]
    for a, b in zip(batched, alone, strict=True):
        assert np.abs(_pixels(a).astype(int) - _pixels(b).astype(int)).max() <= 1


def test_32_concurrent_clients(server) -> None:
    server.wait_idle()

    def call(i: int) -> int:
        with Client(server.address, timeout=170) as c:
            if i % 3 == 0:
                events = list(c.stream(f"prompt {i}", seed=i, **CHEAP))
                return events[-1].result.seed
            if i % 3 == 1:
                return c.subscribe(f"prompt {i}", seed=i, poll_interval=0.2, **CHEAP).seed
            return c.generate(f"prompt {i}", seed=i, **CHEAP).seed

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        seeds = list(pool.map(call, range(32)))
    assert seeds == list(range(32))
    text = metrics_text(server.http_port)
    assert metric(text, "pixart_images_generated_total") >= 32
    assert metric(text, "pixart_queue_depth") == 0


def test_step_cache_counts_reach_the_result_and_the_metrics(server, client) -> None:
    before = metric(metrics_text(server.http_port), "pixart_row_steps_total", kind="cached")
    result = client.generate("a red circle", seed=3, image_size=(256, 256), num_inference_steps=20,
                             guidance_scale=1.0, step_cache="fast")
    assert result.timings.steps_cached > 0
    assert result.timings.steps_computed + result.timings.steps_cached == 20
    exact = client.generate("a red circle", seed=3, image_size=(256, 256), num_inference_steps=20,
                            guidance_scale=1.0)  # the server's default: off
    assert (exact.timings.steps_computed, exact.timings.steps_cached) == (20, 0)
    after = metric(metrics_text(server.http_port), "pixart_row_steps_total", kind="cached")
    assert after - before == result.timings.steps_cached


def test_metrics_cover_stages_queue_and_methods(server, client) -> None:
    client.generate("m", **CHEAP)
    text = metrics_text(server.http_port)
    for stage in ("text_encoding", "denoising", "decoding", "image_encoding", "total"):
        assert metric(text, "pixart_stage_seconds_count", stage=stage) >= 1
    assert metric(text, "pixart_queue_seconds_count") >= 1
    assert metric(text, "pixart_requests_total", method="Generate", code="OK") >= 1


# -- webhooks and expiry -----------------------------------------------------------------------------------------
def test_webhook_called_once_at_the_end(client) -> None:
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/done"
        rid = client.submit("a hook", seed=9, webhook_url=url, **CHEAP)
        wait_for(lambda: received, 60)
        time.sleep(0.5)
        assert len(received) == 1
        body = received[0]
        assert body["request_id"] == rid and body["status"] == "COMPLETED" and body["error"] is None
        assert body["payload"]["seed"] == 9 and body["payload"]["images"][0]["file_data"]
    finally:
        hook.shutdown()


def test_results_expire(tmp_path) -> None:
    srv = ServerThread(config(tmp_path / "store", result_ttl_s=1.0))
    try:
        with Client(srv.address, timeout=60) as c:
            rid = c.submit("short-lived", **CHEAP)
            wait_for(lambda: c.status(rid).state == pb.COMPLETED)
            assert c.result(rid).images

            def gone() -> bool:
                try:
                    c.status(rid)
                except PixArtError as e:
                    return e.code == grpc.StatusCode.NOT_FOUND
                return False

            wait_for(gone, 10)
            wait_for(lambda: not (tmp_path / "store" / "results" / rid).exists(), 10)  # files go with the row
    finally:
        srv.close()


# -- authentication and health -----------------------------------------------------------------------------------
def test_auth_and_health_transitions(tmp_path) -> None:
    srv = ServerThread(config(tmp_path / "store", api_keys=["s3cret", "other"], warmup=True), load=False)
    try:
        # open but not loaded: NOT_SERVING, and health needs no key
        assert health(srv.address) == NOT_SERVING
        for key in (None, "wrong", "s3cre"):
            with Client(srv.address, key=key or "", timeout=10) as c:
                for call in (lambda c=c: c.status("x"), lambda c=c: c.generate("a", **CHEAP),
                             lambda c=c: list(c.stream("a", **CHEAP))):
                    with pytest.raises(PixArtError) as e:
                        call()
                    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.address, key="s3cret", timeout=10) as c:
            with pytest.raises(PixArtError) as e:
                c.generate("a", **CHEAP)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE  # authenticated, but the engine is not loaded
        srv.run(srv.app.load_engine())
        assert health(srv.address) == SERVING and health(srv.address, "pixart.v1.PixArt") == SERVING
        with Client(srv.address, key="other", timeout=60) as c:
            assert c.generate("a", **CHEAP).images
        # the key never reaches the logs; it travels only as metadata
        text = metrics_text(srv.http_port, key="other")
        assert metric(text, "pixart_requests_total", method="Status", code="UNAUTHENTICATED") == 3
        srv.run(srv.app.drain())
        with pytest.raises(grpc.RpcError):  # the port is closed once drained
            health(srv.address)
    finally:
        srv.close()


def test_health_not_serving_while_draining(tmp_path) -> None:
    srv = ServerThread(config(tmp_path / "store", grace_s=30))
    try:
        with Client(srv.address, timeout=60) as c:
            rid = c.submit("long", **SLOW)
            wait_for(lambda: c.status(rid).state == pb.IN_PROGRESS)
            fut = asyncio_run_in(srv, srv.app.drain())
            wait_for(lambda: srv.app.draining)
            assert health(srv.address) == NOT_SERVING
            with pytest.raises(PixArtError) as e:
                c.submit("late", **CHEAP)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            fut.result(60)
    finally:
        srv.close()


def asyncio_run_in(srv: ServerThread, coro):
    import asyncio

    return asyncio.run_coroutine_threadsafe(coro, srv.loop)


# -- TLS -----------------------------------------------------------------------------------------------------------
def test_tls(tmp_path) -> None:
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    srv = ServerThread(config(tmp_path / "store", tls_cert=str(cert), tls_key=str(key), api_keys=["k"]), load=False)
    try:
        with Client(srv.address, key="k", root_certificates=str(cert), timeout=10) as c:
            assert c.cancel("0" * 32).outcome == pb.NOT_FOUND
        with Client(srv.address, key="k", timeout=3) as plain, pytest.raises(PixArtError) as e:
            plain.cancel("0" * 32)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.close()
