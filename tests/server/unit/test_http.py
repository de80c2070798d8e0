"""The HTTP port's routes and fal's adapter, over a fake request service: what each answer looks like, whatever the
core does behind it. (fal's own clients against a real server: tests/acceptance/test_fal.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.request import GenerationRequest, InvalidRequest
from server.api.http.fal import FalApi, request_from_json
from server.api.http.fal_routes import mount as mount_fal
from server.api.http.guard import ConnectionGuard, ConnectionLimits
from server.api.http.openai import OpenAIApi
from server.api.http.openai import mount as mount_openai
from server.api.http.server import HttpServer, build_app
from server.api.keys import ApiKeys
from server.core import records
from server.core.links import ResultSigner
from server.core.service import Lookup
from server.core.work import QueueFull, Unavailable
from server.storage import COMPLETED, FAILED, IN_QUEUE, StoreUnavailable

KEY, APP = "k3y", "fal-ai/pixart-sigma"
RID = "ab" * 16
BROKEN = "ee" * 16  # a lookup of this id raises, as a bug would


class FakeRequests:
    """The request service as fal's adapter sees it: canned answers, and a record of what was submitted."""

    max_queue = 4

    def __init__(self):
        self.ready, self.full = True, False
        self.submitted: list[tuple[GenerationRequest, str, str]] = []
        self.found: dict[str, Lookup] = {}
        self.cancels: dict[str, str] = {}

    def unavailable(self):
        return None if self.ready else Unavailable("the store cannot be reached now; retry shortly")

    def violations(self, request, webhook_url=""):
        hook = [("webhook_url", "must not point at a private address")] if webhook_url.startswith("http://10.") else []
        return hook + request.violations()

    async def submit(self, request, *, webhook_url="", origin="grpc", request_bytes=None, tenant=""):
        if violations := self.violations(request, webhook_url):
            raise InvalidRequest(violations)
        if self.full:
            raise QueueFull()
        self.submitted.append((request, webhook_url, origin))
        return RID, 3

    async def lookup(self, request_id, viewer=None):
        if request_id == BROKEN:
            raise RuntimeError("lost /var/lib/pixart/secret.db")
        return self.found.get(request_id)

    async def cancel(self, request_id, viewer=None):
        return self.cancels.get(request_id, "unknown")

    async def changed(self, request_id):
        await asyncio.sleep(0.01)

    async def start(self, request, *, deadline=None, method="Generate", tenant=""):
        if self.full:
            raise QueueFull()
        raise AssertionError("these tests run nothing")


@pytest.fixture
def service() -> FakeRequests:
    return FakeRequests()


@pytest.fixture
def http(service) -> TestClient:
    app = build_app(keys=ApiKeys([KEY]), healthy=lambda: service.ready)
    mount_fal(FalApi(service, keys=ApiKeys([KEY]), max_streams=4, public_url="https://pixart.example"), app)
    with TestClient(app, headers={"Authorization": f"Key {KEY}"}) as client:
        yield client


def test_fal_input_is_parsed_with_fals_defaults_and_every_mistyped_field_named() -> None:
    request, mistyped = request_from_json({"prompt": "a fox", "image_size": {"width": 640, "height": 480},
                                           "guidance_scale": 3})
    assert mistyped == [] and request.sync_mode is False and request.image_size == (640, 480)
    _, mistyped = request_from_json({"prompt": 1, "seed": "7", "sync_mode": 1, "num_images": True})
    assert [f for f, _ in mistyped] == ["prompt", "seed", "num_images", "sync_mode"]
    assert request_from_json([])[1] == [("body", "must be a JSON object")]
    assert request_from_json({})[1] == [("prompt", "is required")]
    # JSON has one number type: an integral float is the integer (JSON Schema and fal's own validation agree)
    request, mistyped = request_from_json({"prompt": "x", "num_inference_steps": 14.0, "seed": 3.0,
                                           "image_size": {"width": 640.0, "height": 480}})
    assert mistyped == [] and (request.num_inference_steps, request.seed, request.image_size) == (14, 3, (640, 480))
    assert request_from_json({"prompt": "x", "num_images": 1.5})[1] == [("num_images", "must be an integer")]


def test_submit_answers_fals_shape_with_the_public_urls(http, service) -> None:
    r = http.post(f"/queue/{APP}/sub/path", json={"prompt": "a fox", "seed": 7}, params={"fal_webhook":
                                                                                        "https://hooks.example/x"})
    body = r.json()
    assert r.status_code == 200 and r.headers["x-fal-request-id"] == RID
    base = f"https://pixart.example/queue/{APP}/requests/{RID}"
    assert body == {"status": "IN_QUEUE", "request_id": RID, "response_url": base, "status_url": f"{base}/status",
                    "cancel_url": f"{base}/cancel", "queue_position": 3, "gateway_request_id": RID}
    (request, webhook, origin), = service.submitted
    assert (request.prompt, request.seed, webhook, origin) == ("a fox", 7, "https://hooks.example/x", "fal")


def test_submit_refusals(http, service) -> None:
    assert http.post(f"/queue/{APP}", json={"prompt": "x"}, headers={"Authorization": "Key nope"}).status_code == 401
    assert http.post("/queue/someone/else", json={"prompt": "x"}).status_code == 404
    r = http.post(f"/queue/{APP}", json={"prompt": "", "num_images": 9, "guidance_scale": "high"})
    assert r.status_code == 422
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "guidance_scale"], ["body", "prompt"],
                                                      ["body", "num_images"]]
    r = http.post(f"/queue/{APP}", json={"prompt": "x"}, params={"fal_webhook": "http://10.0.0.1/"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "webhook_url"]
    r = http.post(f"/queue/{APP}", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "body"]
    r = http.post(f"/queue/{APP}", content=b"x" * ((1 << 20) + 1))
    assert r.status_code == 413
    service.full = True
    r = http.post(f"/queue/{APP}", json={"prompt": "x"})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
    service.ready = False
    r = http.post(f"/queue/{APP}", json={"prompt": "x"})
    assert r.status_code == 503 and "store" in r.json()["detail"] and int(r.headers["Retry-After"]) > 0
    assert not service.submitted


def test_a_store_that_cannot_be_reached_answers_503_with_retry_after(http, service, monkeypatch) -> None:
    async def away(request_id, viewer=None):
        raise StoreUnavailable("the database cannot be reached now (down or restarting); retry later")

    monkeypatch.setattr(service, "lookup", away)
    for path in (f"/queue/{APP}/requests/{RID}/status", f"/queue/{APP}/requests/{RID}"):
        r = http.get(path)
        assert r.status_code == 503 and "cannot be reached" in r.json()["detail"], path
        assert int(r.headers["Retry-After"]) > 0


def test_a_status_stream_waits_out_a_store_that_goes_away(http, service, monkeypatch) -> None:
    answers = [Lookup(RID, IN_QUEUE, queue_position=1), StoreUnavailable("away"), Lookup(RID, COMPLETED)]

    async def lookup(request_id, viewer=None):
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(service, "lookup", lookup)
    with http.stream("GET", f"/queue/{APP}/requests/{RID}/status/stream") as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and [e["status"] for e in events] == ["COMPLETED"]


def test_status_answers_202_while_queued_and_200_with_the_error_when_failed(http, service) -> None:
    service.found[RID] = Lookup(RID, IN_QUEUE, queue_position=2)
    r = http.get(f"/queue/{APP}/requests/{RID}/status")
    assert r.status_code == 202 and (r.json()["status"], r.json()["queue_position"]) == ("IN_QUEUE", 2)
    error = records.bad_request_status([("prompt", "must be a non-empty string")])
    service.found[RID] = Lookup(RID, FAILED, logs=[{"message": "failed", "level": "ERROR", "timestamp": 0.0}],
                                error=error)
    body = http.get(f"/queue/{APP}/requests/{RID}/status", params={"logs": "1"}).json()
    assert (body["status"], body["error_type"]) == ("COMPLETED", "INVALID_ARGUMENT")
    assert body["logs"][0]["level"] == "ERROR" and body["logs"][0]["timestamp"].endswith("Z")
    result = http.get(f"/queue/{APP}/requests/{RID}")
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "prompt"]
    for unknown in ("0" * 32, "not-an-id"):
        assert http.get(f"/queue/{APP}/requests/{unknown}/status").status_code == 404


def test_cancel_maps_outcomes_to_fals_codes(http, service) -> None:
    for outcome, code, status in (("queued", 202, "CANCELLATION_REQUESTED"), ("running", 202,
                                  "CANCELLATION_REQUESTED"), ("ended", 400, "ALREADY_COMPLETED")):
        service.found[RID], service.cancels[RID] = Lookup(RID, COMPLETED), outcome
        r = http.put(f"/queue/{APP}/requests/{RID}/cancel")
        assert (r.status_code, r.json()) == (code, {"status": status})
    assert http.put(f"/queue/{APP}/requests/{'0' * 32}/cancel").status_code == 404


def test_the_proxy_routes_fal_hosts_only(http, service) -> None:
    service.found[RID] = Lookup(RID, IN_QUEUE, queue_position=0)
    target = f"https://queue.fal.run/{APP}/requests/{RID}/status"
    r = http.get("/fal/proxy", headers={"x-fal-target-url": target})
    assert r.status_code == 202 and r.json()["request_id"] == RID
    for bad in ("https://evil.example/x", "http://queue.fal.run/x", "", "https://" + "a" * 9000):
        assert http.get("/fal/proxy", headers={"x-fal-target-url": bad}).status_code == 400
    # the key comes first, whatever the header names (as on every other route)
    r = http.get("/fal/proxy", headers={"x-fal-target-url": "https://evil.example/", "Authorization": "Key nope"})
    assert r.status_code == 401


def test_a_post_to_a_request_route_is_405_not_a_submit(http, service) -> None:
    for path, allowed in ((f"requests/{RID}", "GET"), (f"requests/{RID}/status", "GET"),
                          (f"requests/{RID}/cancel", "PUT"), (f"requests/{RID}/status/stream", "GET")):
        r = http.post(f"/queue/{APP}/{path}", json={"prompt": "x"})
        assert (r.status_code, r.headers["Allow"]) == (405, allowed), path
    assert service.submitted == []
    assert http.post(f"/queue/{APP}/some/endpoint", json={"prompt": "x"}).status_code == 200  # fal's subpaths


def test_results_need_a_valid_signature_or_the_key(tmp_path) -> None:
    picture = tmp_path / "image_0.png"
    picture.write_bytes(b"\x89PNG...")
    signer = ResultSigner(b"s" * 32, 60)

    async def result_file(request_id: str, file_name: str, viewer: str | None) -> Path | None:
        return picture if (request_id, file_name) == (RID, "image_0.png") else None

    def client(keys: list[str]) -> TestClient:
        return TestClient(build_app(keys=ApiKeys(keys), healthy=lambda: False, signer=signer, result_file=result_file,
                                    render_metrics=lambda: b"pixart_up 1\n"))

    url = signer.url("", RID, "image_0.png").removeprefix("/")
    with client([]) as open_port, client([KEY]) as keyed:
        assert open_port.get(f"/{url}").content == b"\x89PNG..."
        expired = signer.url("", RID, "image_0.png", now=time.time() - 120)
        assert open_port.get(expired).status_code == 403
        assert open_port.get(url.replace(url[-4:], "0000")).status_code == 403  # a tampered signature
        assert open_port.get(f"/results/{RID}/image_0.png").status_code == 403
        assert open_port.get(f"/results/{RID}/..%2Fkeys").status_code == 404  # not a name the engine writes
        assert keyed.get(f"/results/{RID}/image_0.png").status_code == 401
        assert keyed.get(f"/results/{RID}/image_0.png", headers={"Authorization": f"Key {KEY}"}).status_code == 200
        assert keyed.get(f"/{url}".replace(RID, "cd" * 16)).status_code == 403  # signed for another request
        # digits that are not ASCII, a signature that is not ASCII: refused, never a 500
        assert open_port.get(f"/results/{RID}/image_0.png?expires=%C2%B2&signature={'0' * 64}").status_code == 403
        assert open_port.get(f"/results/{RID}/image_0.png?expires=9999999999&signature={'é' * 64}").status_code == 403
        assert open_port.get("/metrics").text == "pixart_up 1\n" and keyed.get("/metrics").status_code == 401
        assert open_port.get("/healthz").status_code == 503


def test_api_keys() -> None:
    keys = ApiKeys(["alpha", "beta"])
    assert keys.allows("Key beta") and keys.proves("Key alpha")
    assert not any(keys.allows(h) for h in ("", "Key ", "Key alph", "Basic alpha", "key alpha", "Bearer "))
    assert keys.allows("Bearer alpha") and keys.tenant("Bearer beta") == keys.tenant("Key beta")  # OpenAI's form
    assert ApiKeys().allows("") and not ApiKeys().proves("Key anything")


def test_named_keys_from_a_file_give_each_call_its_tenant(tmp_path) -> None:
    import hashlib

    from server.api.keys import load_keys

    digest = hashlib.sha256(b"carol-key").hexdigest()
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nalice alice-key-1\nalice alice-key-2  # rotated\ncarol sha256:{digest}\n"
                    "plainkey\n")
    keys = ApiKeys(load_keys(["flag-key"], str(path)))
    assert [keys.tenant(f"Key {k}") for k in ("alice-key-1", "alice-key-2", "carol-key")] == ["alice"] * 2 + ["carol"]
    assert keys.tenant("Key plainkey") == "key-" + hashlib.sha256(b"plainkey").hexdigest()[:8]
    assert keys.allows("Key flag-key") and not keys.allows(f"Key sha256:{digest}")  # the hash is not the key
    assert keys.tenant("Key nobody") == "" and ApiKeys().tenant("Key anyone") == ""
    assert not keys.allows("Key ²é☃" * 10)  # any bytes are hashed: nothing raises on a non-ASCII key
    path.write_text("alice bob key-with-three-fields\n")
    with pytest.raises(ValueError, match=r"keys:1: options are max_active=N and rate=R") as bad:
        load_keys(keys_file=str(path))
    assert "key-with-three-fields" not in str(bad.value) and "bob" not in str(bad.value)
    path.write_text("team-x k1 max_active=2 rate=0.5\nteam-x k2\n")
    limited = ApiKeys(load_keys(keys_file=str(path)))
    assert limited.tenant("Key k2") == "team-x" and (limited.limits("team-x").max_active,
                                                      limited.limits("team-x").rate) == (2, 0.5)
    assert limited.limits("other") == limited.limits("")  # unlimited
    path.write_text("ops k-ops admin\nteam-x k-x rate=2\n")
    owned = ApiKeys(load_keys(keys_file=str(path)))
    assert [owned.viewer(f"Key {k}") for k in ("k-ops", "k-x")] == [None, "team-x"]  # an admin sees every tenant
    assert owned.viewer("Key nobody") not in (None, "", "team-x") and ApiKeys().viewer("") is None


def test_the_port_answers_without_waiting_for_delayed_acks() -> None:
    """Responses go out in two writes (headers, body); without TCP_NODELAY each keep-alive call waited ~40 ms for the
    client's delayed ACK. Accepted connections inherit the option from the listening socket."""
    guard = ConnectionGuard(ConnectionLimits(8, 8, 1.0, 1.0, 1.0))
    server = HttpServer(build_app(keys=ApiKeys(), healthy=lambda: True), "127.0.0.1", 0, guard=guard)
    try:
        assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.socket.close()


def test_a_route_that_raises_answers_a_correlation_id_and_logs_at_most_ten_tracebacks_a_minute(service, caplog) -> None:
    app = build_app(keys=ApiKeys([KEY]), healthy=lambda: service.ready)
    mount_fal(FalApi(service, keys=ApiKeys([KEY]), max_streams=4), app)
    with TestClient(app, headers={"Authorization": f"Key {KEY}"}, raise_server_exceptions=False) as client:
        with caplog.at_level("ERROR", logger="pixart.server.http"):
            answers = [client.get(f"/queue/{APP}/requests/{BROKEN}/status") for _ in range(30)]
    assert {a.status_code for a in answers} == {500}
    details = [a.json()["detail"] for a in answers]
    assert all(d.startswith("internal error; correlation id ") and "secret" not in d for d in details)
    logged = [r for r in caplog.records if r.getMessage() == "internal error"]
    assert len(logged) == 10 and logged[0].exc_info is not None
    assert logged[0].correlation_id in details[0]  # the answer's id finds the traceback


def test_cors_answers_only_the_origins_the_operator_listed() -> None:
    app = build_app(keys=ApiKeys(), healthy=lambda: True, cors_origins=["https://app.example"])
    with TestClient(app) as client:
        asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = client.options("/healthz", headers={"Origin": "https://app.example", **asked})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = client.options("/healthz", headers={"Origin": "https://evil.example", **asked})
        assert "access-control-allow-origin" not in refused.headers
    with TestClient(build_app(keys=ApiKeys(), healthy=lambda: True)) as client:  # the default: none
        assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "https://a.example"}).headers


def test_openais_route_answers_a_full_queue_429_with_retry_after_in_openais_shape(service) -> None:
    app = build_app(keys=ApiKeys([KEY]), healthy=lambda: True)
    mount_openai(OpenAIApi(service, keys=ApiKeys([KEY]), app_ids=set()), app)
    service.full = True
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        r = client.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "requests"
        r = client.post("/v1/images/generations", json={"prompt": "x", "size": "99x99"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "size"
        r = client.post("/v1/images/generations", json={"prompt": "x", "n": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # OpenAI's name, not the engine's
