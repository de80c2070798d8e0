"""An S3-compatible server for the tests, started by the test session itself: moto's own server on loopback, on a
port of its choosing (no Docker, no network beyond 127.0.0.1). Each caller gets a fresh bucket. Tests that need it
skip, saying why, only where moto is not installed.

moto checks neither the signature nor the expiry of a presigned URL (AWS S3 and MinIO do): the tests check the
expiry window the URL was signed with, and that the object is refused without one."""

from __future__ import annotations

import threading
import uuid

import pytest

_lock = threading.Lock()
_server = None
REGION = "us-east-1"
# fixed, fake credentials for the standard chain (through the environment, as a deployment would give them); the
# shared config files are pointed away so that a developer's own ~/.aws is never read, and the instance metadata
# service is never asked (it would be a request off this machine)
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "",
       "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true",
       "AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_S3": "", "AWS_PROFILE": ""}


def endpoint() -> str:
    """The URL of the session's S3 server, started on first use."""
    global _server
    with _lock:
        if _server is None:
            try:
                from moto.server import ThreadedMotoServer
            except ImportError:
                pytest.skip("object-storage tests need moto[server] (pip install -e '.[dev]')")
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            _server = server
        host, port = _server.get_host_and_port()
        return f"http://{host}:{port}"


def client():
    """A boto3 client of the test server, independent of the server under test (with the credentials of ENV)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint(), region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def new_bucket() -> str:
    name = "t-" + uuid.uuid4().hex[:16]
    client().create_bucket(Bucket=name)
    return name


def keys(bucket: str) -> list[str]:
    return sorted(obj["Key"] for obj in client().list_objects_v2(Bucket=bucket).get("Contents", []))
