"""fal's queue protocol on the HTTP port, over TLS with a throwaway certificate: every endpoint through a real HTTP
client, then fal's own Python client (`fal-client`, PyPI) pointed here by environment variables alone."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from server.webhooks import verify
from tests.support.servers import ServerThread, config, wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

KEY = "fal-test-key"
APP = "fal-ai/pixart-sigma"
CHEAP = {"num_inference_steps": 2, "image_size": {"width": 256, "height": 256}}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed for a throwaway certificate)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def server(tls, tmp_path_factory):
    cert, key = tls
    srv = ServerThread(config(tmp_path_factory.mktemp("store"), api_keys=[KEY], tls_cert=str(cert), tls_key=str(key),
                              webhook_allow=["127.0.0.0/8"], webhook_secret="whsec", max_batch=1,
                              app_ids=["acme/other"]))
    yield srv
    srv.close()


@pytest.fixture
def http(server, tls):
    with httpx.Client(base_url=f"https://127.0.0.1:{server.http_port}", verify=str(tls[0]), timeout=60,
                      headers={"Authorization": f"Key {KEY}"}) as client:
        yield client


def submit(http, body: dict, path: str = APP, **params) -> dict:
    r = http.post(f"/queue/{path}", json=body, params=params)
    assert r.status_code == 200, r.text
    data = r.json()
    assert r.headers["x-fal-request-id"] == data["request_id"] and r.headers["content-type"] == "application/json"
    return data


def wait_completed(http, rid: str) -> dict:
    return wait_for(lambda: (r := http.get(f"/queue/{APP}/requests/{rid}/status")).status_code == 200 and r.json())


def test_submit_status_result(http, server) -> None:
    data = submit(http, {"prompt": "a red circle", "seed": 7, "step_cache": "off", **CHEAP})
    base = f"https://127.0.0.1:{server.http_port}/queue/{APP}/requests/{data['request_id']}"
    assert data["status"] == "IN_QUEUE" and data["queue_position"] == 0  # the server is idle: it is next
    assert (data["response_url"], data["status_url"], data["cancel_url"]) == (base, f"{base}/status",
                                                                               f"{base}/cancel")
    rid = data["request_id"]
    first = http.get(f"/queue/{APP}/requests/{rid}/status")
    assert first.status_code in (200, 202)
    done = wait_completed(http, rid)
    assert done["status"] == "COMPLETED" and done["logs"] is None and done["metrics"]["inference_time"] > 0
    for spelling in ("1", "true"):
        logs = http.get(f"/queue/{APP}/requests/{rid}/status", params={"logs": spelling}).json()["logs"]
        assert logs and {"message", "level", "source", "timestamp"} <= set(logs[0])
    for spelling in ("0", "false"):
        assert http.get(f"/queue/{APP}/requests/{rid}/status", params={"logs": spelling}).json()["logs"] is None
    result = http.get(f"/queue/{APP}/requests/{rid}")
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
    out = result.json()
    assert out["seed"] == 7 and out["prompt"] == "a red circle" and out["has_nsfw_concepts"] == [False]
    # two steps of a guided image: two transformer rows each, none from the step cache
    assert (out["timings"]["steps_computed"], out["timings"]["steps_cached"]) == (4, 0)
    image = out["images"][0]
    assert {"url", "width", "height", "content_type", "file_name", "file_size"} <= set(image)
    assert (image["width"], image["height"]) == (256, 256) and "signature=" in image["url"]
    fetched = http.get(image["url"].split(str(server.http_port), 1)[1], headers={"Authorization": ""})
    assert fetched.status_code == 200 and len(fetched.content) == image["file_size"]  # a signed URL, no key


def test_subpath_submit_and_sync_mode_data_uri(http) -> None:
    data = submit(http, {"prompt": "a ring", "sync_mode": True, **CHEAP}, path=f"{APP}/some/subpath")
    assert f"/queue/{APP}/requests/" in data["status_url"]
    wait_completed(http, data["request_id"])
    image = http.get(f"/queue/{APP}/requests/{data['request_id']}").json()["images"][0]
    assert image["url"].startswith("data:image/png;base64,")
    assert len(base64.b64decode(image["url"].split(",", 1)[1])) == image["file_size"]


def test_status_stream_sends_new_logs_and_ends_after_completed(http) -> None:
    ahead = submit(http, {"prompt": "ahead", "num_inference_steps": 100, "num_images": 8, "image_size": "square"})
    wait_for(lambda: http.get(f"/queue/{APP}/requests/{ahead['request_id']}/status").json()["status"] == "IN_PROGRESS")
    rid = submit(http, {"prompt": "a star", **CHEAP})["request_id"]  # --max-batch 1: it waits its turn
    events = []
    with http.stream("GET", f"/queue/{APP}/requests/{rid}/status/stream", params={"logs": "1"},
                     headers={"Accept": "application/json, text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[0]["status"] == "IN_QUEUE" and events[-1]["status"] == "COMPLETED"
    messages = [m["message"] for e in events for m in (e.get("logs") or [])]
    assert len(messages) == len(set(messages)) and "completed" in messages  # each line once


def test_cancel_in_each_state(http) -> None:
    slow = {"prompt": "slow", "num_inference_steps": 100, "num_images": 8, "image_size": "square"}
    running = submit(http, slow)["request_id"]
    wait_for(lambda: http.get(f"/queue/{APP}/requests/{running}/status").json()["status"] == "IN_PROGRESS")
    queued = submit(http, {"prompt": "queued", **CHEAP})["request_id"]  # --max-batch 1: it waits
    assert http.get(f"/queue/{APP}/requests/{queued}/status").json()["status"] == "IN_QUEUE"
    for rid in (queued, running):
        r = http.put(f"/queue/{APP}/requests/{rid}/cancel")
        assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    final = wait_completed(http, running)
    assert final["status"] == "COMPLETED" and final["error_type"] == "CANCELLED"
    assert http.get(f"/queue/{APP}/requests/{running}").status_code == 400
    r = http.put(f"/queue/{APP}/requests/{running}/cancel")
    assert (r.status_code, r.json()) == (400, {"status": "ALREADY_COMPLETED"})
    r = http.put(f"/queue/{APP}/requests/{'0' * 32}/cancel")
    assert (r.status_code, r.json()) == (404, {"status": "NOT_FOUND"})


def test_invalid_input_is_422_naming_every_field(http) -> None:
    bad = {"prompt": "", "num_images": 9, "guidance_scale": "high", "image_size": {"width": 10, "height": 3000},
           "step_cache": "turbo"}
    for r in (http.post(f"/queue/{APP}", json=bad), http.post(f"/run/{APP}", json=bad)):
        assert r.status_code == 422
        locs = {tuple(d["loc"]) for d in r.json()["detail"]}
        assert locs == {("body", "prompt"), ("body", "num_images"), ("body", "guidance_scale"),
                        ("body", "image_size", "width"), ("body", "image_size", "height"), ("body", "step_cache")}
        assert all({"loc", "msg", "type"} <= set(d) for d in r.json()["detail"])
    r = http.post(f"/queue/{APP}", json={"prompt": "x"}, params={"fal_webhook": "http://169.254.169.254/"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "webhook_url"]


def test_keys_apps_and_sync_run(http, server, tls) -> None:
    with httpx.Client(base_url=str(http.base_url), verify=str(tls[0])) as anonymous:
        assert anonymous.post(f"/queue/{APP}", json={"prompt": "x"}).status_code == 401
    assert http.post("/queue/nobody/unknown", json={"prompt": "x"}).status_code == 404
    assert submit(http, {"prompt": "another app", **CHEAP}, path="acme/other")["status"] == "IN_QUEUE"
    r = http.post(f"/run/{APP}", json={"prompt": "right away", "sync_mode": True, **CHEAP})
    assert r.status_code == 200 and r.json()["images"][0]["url"].startswith("data:image/png;base64,")


def test_proxy_routes_by_target_url_and_refuses_other_hosts(http) -> None:
    target = f"https://queue.fal.run/{APP}"
    r = http.post("/fal/proxy", json={"prompt": "through the proxy", **CHEAP}, headers={"x-fal-target-url": target})
    assert r.status_code == 200
    rid = r.json()["request_id"]
    status = http.get("/fal/proxy", headers={"x-fal-target-url": f"{target}/requests/{rid}/status?logs=1"})
    assert status.status_code in (200, 202) and status.json()["request_id"] == rid
    run = http.post("/fal/proxy", json={"prompt": "run", "sync_mode": True, **CHEAP},
                    headers={"x-fal-target-url": f"https://fal.run/{APP}"})
    assert run.status_code == 200 and run.json()["images"]
    for bad in ("https://evil.example/fal-ai/pixart-sigma", "http://queue.fal.run/x/y", ""):
        assert http.post("/fal/proxy", json={}, headers={"x-fal-target-url": bad}).status_code == 400


class Hook:
    def __init__(self):
        self.calls: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.calls.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def test_webhook_gets_fals_payload_signed(http) -> None:
    hook = Hook()
    try:
        data = submit(http, {"prompt": "hooked", "seed": 3, **CHEAP}, fal_webhook=hook.url)
        assert data["gateway_request_id"] == data["request_id"]
        wait_for(lambda: hook.calls)
        headers, body = hook.calls[0]
        payload = json.loads(body)
        assert payload["request_id"] == payload["gateway_request_id"] == data["request_id"]
        assert payload["status"] == "OK" and payload["error"] is None and payload["payload"]["seed"] == 3
        assert verify(b"whsec", headers, body)
    finally:
        hook.close()


FAL_CLIENT_SCRIPT = textwrap.dedent('''
    import json, sys
    import fal_client

    app, hook, out = "fal-ai/pixart-sigma", sys.argv[1], {}
    updates = []
    result = fal_client.subscribe(app, arguments={"prompt": "a red circle", "seed": 11, "num_inference_steps": 2,
                                                  "image_size": {"width": 256, "height": 256}},
                                  with_logs=True, on_queue_update=updates.append)
    out["subscribe"] = {"seed": result["seed"], "images": len(result["images"]),
                        "updates": sorted({type(u).__name__ for u in updates}),
                        "logs": sum(len(getattr(u, "logs", None) or []) for u in updates)}
    handle = fal_client.submit(app, arguments={"prompt": "with a webhook", "num_inference_steps": 2,
                                               "image_size": "square"}, webhook_url=hook)
    out["submit_id"] = handle.request_id
    out["status"] = type(fal_client.status(app, handle.request_id, with_logs=True)).__name__
    out["result_seed_type"] = type(fal_client.result(app, handle.request_id)["seed"]).__name__
    slow = fal_client.submit(app, arguments={"prompt": "cancel me", "num_inference_steps": 100, "num_images": 8})
    fal_client.cancel(app, slow.request_id)
    out["cancelled"] = slow.request_id
    try:
        fal_client.submit(app, arguments={"prompt": "", "num_images": 99})
        out["invalid"] = "accepted"
    except fal_client.client.FalClientHTTPError as e:
        out["invalid"] = e.status_code
    run = fal_client.run(app, arguments={"prompt": "sync", "sync_mode": True, "num_inference_steps": 2,
                                         "image_size": {"width": 256, "height": 256}})
    out["run_url_prefix"] = run["images"][0]["url"][:22]
    print(json.dumps(out))
''')


def test_fal_client_works_by_configuration_alone(server, tls, tmp_path) -> None:
    pytest.importorskip("fal_client")
    hook = Hook()
    port = server.http_port
    env = dict(os.environ, FAL_KEY=KEY, FAL_QUEUE_RUN_HOST=f"127.0.0.1:{port}/queue",
               FAL_RUN_HOST=f"127.0.0.1:{port}/run", SSL_CERT_FILE=str(tls[0]))
    try:
        done = subprocess.run([sys.executable, "-c", FAL_CLIENT_SCRIPT, hook.url], env=env, capture_output=True,
                              text=True, timeout=240, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["subscribe"]["seed"] == 11 and out["subscribe"]["images"] == 1
        assert "Completed" in out["subscribe"]["updates"] and out["subscribe"]["logs"] > 0
        assert out["status"] in ("Queued", "InProgress", "Completed") and out["result_seed_type"] == "int"
        assert out["invalid"] == 422 and out["run_url_prefix"] == "data:image/png;base64,"
        wait_for(lambda: hook.calls)
        assert json.loads(hook.calls[0][1])["request_id"] == out["submit_id"]
        cancelled = wait_for(lambda: (s := server.app.store.get(out["cancelled"])) and s.state in ("CANCELED",) and s)
        assert cancelled.state == "CANCELED"
    finally:
        hook.close()


def test_oversized_and_overflowing_bodies(http) -> None:
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    r = http.post(f"/queue/{APP}", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413  # refused on its declared length, before it is read
    r = http.post(f"/queue/{APP}", content=b'{"prompt": "x", "guidance_scale": 1' + b"0" * 400 + b"}",
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "guidance_scale"]
