"""Result images in S3-compatible object storage (`--results s3://bucket/prefix`), against moto's S3 server on
loopback: the results contract (written before the row, read back, presigned, deleted on expiry, hostile ids and
names refused before a key is made), a request served end to end on SQLite + S3 (its URL is a presigned URL of the
object with the server's URL lifetime; sync results come back as bytes read from the bucket; the server's own
/results URL redirects to the object), and two replicas on PostgreSQL + S3 (the one that did not run the request
hands out a working URL)."""

from __future__ import annotations

import calendar
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from protos.pixart.v1 import pixart_pb2 as pb
from server import storage as st
from server.client import Client
from server.storage import new_request_id, open_store
from server.storage.s3 import ResultsUnavailable, S3Results
from tests.support import s3server
from tests.support.postgres import new_database
from tests.support.servers import ServerThread, config, wait_for

pytestmark = pytest.mark.timeout(120)
REQUEST = b"\x0a\x03cat"
CHEAP = dict(num_inference_steps=2, image_size=(256, 256))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bucket(monkeypatch) -> str:
    for name, value in s3server.ENV.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    return s3server.new_bucket()


def _s3() -> dict:
    return {"endpoint_url": s3server.endpoint(), "region": s3server.REGION}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, bucket, tmp_path):
    where = tmp_path / "store" if request.param == "sqlite" else new_database()
    s = open_store(where, f"s3://{bucket}/out", s3=_s3())
    assert s.backend == request.param and isinstance(s.results, S3Results)
    yield s
    s.close()


def _expiry_window(url: str) -> tuple[float, int]:
    """(when it was signed, for how many seconds) as the presigned URL states them."""
    query = parse_qs(urlsplit(url).query)
    signed = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    return signed, int(query["X-Amz-Expires"][0])


def test_results_contract_on_s3(store, bucket) -> None:
    rid, other = new_request_id(), new_request_id()
    assert store.finish(rid, st.COMPLETED, request=REQUEST, result=b"r",
                        images=[("image_0.png", PNG + b"0"), ("image_1.png", PNG + b"1")])
    assert store.finish(other, st.COMPLETED, request=REQUEST, result=b"r", images=[("image_0.png", PNG + b"x")])
    assert s3server.keys(bucket) == sorted([f"out/{rid}/image_0.png", f"out/{rid}/image_1.png",
                                            f"out/{other}/image_0.png"])
    assert store.image_bytes(rid, "image_1.png") == PNG + b"1"
    assert store.image_bytes(rid, "image_2.png") is None and store.image_path(rid, "image_0.png") is None
    url = store.results.url(rid, "image_0.png", 90)
    assert url.startswith(f"{s3server.endpoint()}/{bucket}/out/{rid}/image_0.png?")
    signed, lifetime = _expiry_window(url)
    assert lifetime == 90 and abs(signed - time.time()) < 30
    got = httpx.get(url)
    assert (got.status_code, got.content, got.headers["content-type"]) == (200, PNG + b"0", "image/png")
    assert httpx.get(url.split("?")[0]).status_code == 403  # private: only the signed URL opens it

    # nothing but an issued id and an engine-made name reaches the bucket, whatever the operation
    calls = _record_calls(store.results)
    for bad_id, bad_name in ((rid, "../image_0.png"), (rid, "image_0.png/x"), ("../" + rid, "image_0.png"),
                             ("", "image_0.png"), (rid.upper(), "image_0.png")):
        assert store.results.read(bad_id, bad_name) is None and store.results.url(bad_id, bad_name, 9) is None
        with pytest.raises(ValueError):
            store.results.write(bad_id, [(bad_name, b"x")])
    hostile_finish = new_request_id()
    with pytest.raises(ValueError):  # and a finish naming a hostile file writes neither it nor the row
        store.finish(hostile_finish, st.COMPLETED, request=REQUEST, images=[("../x.png", b"")])
    assert store.get(hostile_finish) is None
    for hostile in ("", "out", "*", rid[:8], "../" + rid, rid + "/.."):
        store.results.delete(hostile)
    assert calls == [] and len(s3server.keys(bucket)) == 3

    # expiry removes the request's objects, and only its own
    row = store.get(rid)
    store._update("UPDATE requests SET finished = ? WHERE id = ?", (row.finished - 100, rid))
    assert store.expire(50) == 1
    assert store.get(rid) is None and store.image_bytes(rid, "image_0.png") is None
    assert s3server.keys(bucket) == [f"out/{other}/image_0.png"]


def test_images_are_stored_before_the_row_names_them(store, bucket) -> None:
    s3server.client().delete_bucket(Bucket=bucket)  # every PUT now fails
    rid = new_request_id()
    with pytest.raises(Exception, match="NoSuchBucket"):
        store.finish(rid, st.COMPLETED, request=REQUEST, result=b"r", images=[("image_0.png", PNG)])
    assert store.get(rid) is None  # no COMPLETED row names an image that is not there


def _record_calls(results: S3Results) -> list[str]:
    """Every S3 operation the results object asks for from now on (a presign counts: it names a key)."""
    calls: list[str] = []
    real = results.client

    class Recorder:
        def __getattr__(self, name: str):
            calls.append(name)
            return getattr(real, name)

    results.client = Recorder()
    return calls


def test_an_unreachable_bucket_is_refused_at_start(bucket) -> None:
    with pytest.raises(ResultsUnavailable, match="cannot be reached"):
        S3Results(f"s3://{bucket}-missing/x", **_s3())
    with pytest.raises(ValueError):
        S3Results("s3:///nobucket", **_s3())


def _fetch(url: str) -> bytes:
    got = httpx.get(url)
    assert got.status_code == 200, got.text[:300]
    return got.content


def test_served_on_sqlite_and_s3(bucket, tmp_path) -> None:
    srv = ServerThread(config(tmp_path / "store", results=f"s3://{bucket}/px/", result_url_ttl_s=120,
                              s3_endpoint_url=s3server.endpoint(), s3_region=s3server.REGION))
    try:
        with Client(srv.address, timeout=60) as c:
            rid = c.submit("a boat", sync_mode=False, **CHEAP)
            inline = c.submit("a boat", sync_mode=True, **CHEAP)
            for r in (rid, inline):
                wait_for(lambda r=r: c.status(r).state == pb.COMPLETED)
            result = c.result(rid)
            image = result.images[0]
            assert not image.file_data and image.url.startswith(f"{s3server.endpoint()}/{bucket}/px/{rid}/")
            signed, lifetime = _expiry_window(image.url)
            assert lifetime == 120 and abs(signed - time.time()) < 30  # the server's URL lifetime, from now
            data = _fetch(image.url)
            assert data.startswith(PNG) and len(data) == image.file_size
            # sync_mode: the bytes themselves, read back from the bucket (the row never holds them)
            kept = c.result(inline).images[0]
            assert not kept.url and kept.file_data.startswith(PNG)
            assert kept.file_data == s3server.client().get_object(
                Bucket=bucket, Key=f"px/{inline}/{kept.file_name}")["Body"].read()
        # a URL naming the server (signed by it) still works: the same checks, then a redirect to the object
        own = srv.app.signer.url(f"http://127.0.0.1:{srv.http_port}", rid, image.file_name)
        hop = httpx.get(own)
        assert hop.status_code == 307 and hop.headers["location"].startswith(f"{s3server.endpoint()}/{bucket}/")
        assert _fetch(hop.headers["location"]) == data
        assert httpx.get(own.replace("signature=", "signature=0")).status_code == 403
        # a sync result has no URL, on the server or in the bucket
        sync_url = srv.app.signer.url(f"http://127.0.0.1:{srv.http_port}", inline, kept.file_name)
        assert httpx.get(sync_url).status_code == 404
        # expiry (the server's loop runs store.expire) takes the request's objects with it
        assert srv.app.store.expire(120, now=srv.app.store.get(rid).finished + 121) >= 1
        assert not [k for k in s3server.keys(bucket) if rid in k]
    finally:
        srv.close()


def test_two_replicas_on_postgresql_and_s3(bucket) -> None:
    url = new_database()
    shared = dict(results=f"s3://{bucket}", s3_endpoint_url=s3server.endpoint(), s3_region=s3server.REGION,
                  poll_s=0.05, lease_s=5.0)
    runner = ServerThread(config(url, replica_id="a", **shared))
    # the other replica never loads an engine, so it cannot claim: whatever it answers comes from the store
    other = ServerThread(config(url, replica_id="b", **shared), load=False)
    try:
        with Client(runner.address, timeout=60) as c:
            rid = c.submit("a lighthouse", sync_mode=False, **CHEAP)
        with Client(other.address, timeout=60) as c:
            wait_for(lambda: c.status(rid).state == pb.COMPLETED)
            image = c.result(rid).images[0]
        assert image.url.startswith(f"{s3server.endpoint()}/{bucket}/{rid}/")
        assert _fetch(image.url).startswith(PNG)
    finally:
        other.close()
        runner.close()


def test_serve_flags_for_s3_results(monkeypatch, tmp_path) -> None:
    from pixart_cli import build_parser
    from server.cli import config_from_args

    def parse(*argv: str):
        argv = ("serve", "--engine", str(tmp_path), "--store", str(tmp_path), *argv)
        return config_from_args(build_parser().parse_args(argv))

    monkeypatch.delenv("PIXART_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")  # the SDKs' own variable is honoured
    cfg = parse("--results", "s3://bucket/prefix", "--s3-region", "eu-west-1")
    assert (cfg.results, cfg.s3_endpoint_url, cfg.s3_region) == ("s3://bucket/prefix", "http://minio:9000",
                                                                 "eu-west-1")
    assert parse("--results", "s3://b", "--s3-endpoint-url", "http://other:9000").s3_endpoint_url == \
        "http://other:9000"
    with pytest.raises(SystemExit, match="7 days"):  # S3 refuses presigned URLs that last longer
        parse("--results", "s3://b", "--result-url-ttl", str(8 * 24 * 3600))
    monkeypatch.setitem(__import__("sys").modules, "boto3", None)  # as if the [s3] extra were not installed
    with pytest.raises(SystemExit, match=r"\[s3\]"):
        parse("--results", "s3://b")
    assert parse("--results", str(tmp_path / "r")).results == str(tmp_path / "r")  # folders need no boto3
