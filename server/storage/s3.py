"""Result images in S3-compatible object storage (`--results s3://bucket/prefix`): AWS S3, MinIO, Ceph RGW, R2...

One object per image, key <prefix>/<request_id>/<file_name>. A PUT is atomic per object (a reader sees all of it or
nothing), which is the promise the folder backend keeps with rename, so the store's ordering holds unchanged: every
image is uploaded under the row's lock before the COMPLETED row names it. Clients get presigned GET URLs straight to
the bucket (the server does not carry the bytes); the server reads an object back only when it must answer with the
bytes themselves (sync_mode results kept in the store).

Credentials come from boto3's standard chain (environment, shared files, web identity / IRSA, instance role). boto3
is an optional extra (`pip install '.[s3]'`): most deployments keep results in a folder and need not carry botocore.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .ids import is_request_id, is_result_file_name
from .results import ResultWriteFailed

log = logging.getLogger("pixart.server")
# SigV4 query signatures are refused by S3 beyond this many seconds.
MAX_PRESIGN_S = 7 * 24 * 3600


class ResultsUnavailable(RuntimeError):
    """The results bucket cannot be used (no boto3, unreachable endpoint, missing bucket, refused credentials)."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, "prefix/") ; the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"--results {url!r}: expected s3://bucket or s3://bucket/prefix")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Results:
    """FolderResults' interface on a bucket: write, read, url (presigned), path (never: no local file), delete."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 check: bool = True):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ResultsUnavailable("--results s3://... needs boto3: pip install 'pixart-sigma-serve[s3]'") from None
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self.bucket, self.prefix = parse_s3_url(url)
        config = Config(
            signature_version="s3v4",
            # S3-compatible servers behind an endpoint URL rarely have wildcard DNS for virtual-hosted buckets
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # a store that is down, erring or hanging costs a request at most ~4 x 10 s (retries back off between)
            # before it fails, saying so (ResultWriteFailed), rather than holding it without bound
            connect_timeout=5, read_timeout=10, retries={"max_attempts": 4, "mode": "standard"},
        )
        # a client is thread-safe (a session is not): one per store, shared by the worker and the event loop
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                     config=config)
        if check:  # a wrong bucket, endpoint or credential fails at startup, not at the first finished request
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except self._errors as exc:
                raise ResultsUnavailable(f"--results s3://{self.bucket}: the bucket cannot be reached: {exc}") from None

    def _key(self, request_id: str, file_name: str) -> str:
        # only the issued id format and engine-made names ever become a key: no "..", no "/", no other prefix
        if not (is_request_id(request_id) and is_result_file_name(file_name)):
            raise ValueError("result keys take an issued request id and an image_<index>.<ext> file name")
        return f"{self.prefix}{request_id}/{file_name}"

    def write(self, request_id: str, images: Sequence[tuple[str, bytes]]) -> None:
        """One PUT per image (atomic per object; the client retries with backoff and times out, see __init__);
        ResultWriteFailed when one fails anyway, after deleting those written, so the row is not written."""
        keys = [self._key(request_id, name) for name, _ in images]  # every name checked before the first PUT
        try:
            for key, (name, data) in zip(keys, images, strict=True):
                kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=kind)
        except self._errors as exc:
            self.delete(request_id)
            raise ResultWriteFailed(f"the object store did not take the images: {str(exc)[:300]}") from exc

    def read(self, request_id: str, file_name: str) -> bytes | None:
        if not (is_request_id(request_id) and is_result_file_name(file_name)):
            return None
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(request_id, file_name))
            return obj["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def url(self, request_id: str, file_name: str, ttl_s: float) -> str | None:
        """A presigned GET of the object, valid for ttl_s (local signing: no request is made)."""
        if not (is_request_id(request_id) and is_result_file_name(file_name)):
            return None
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(request_id, file_name)},
            ExpiresIn=int(min(max(ttl_s, 1), MAX_PRESIGN_S)))

    def path(self, request_id: str, file_name: str) -> Path | None:
        return None  # objects have no local file; callers use read() or url()

    def delete(self, request_id: str) -> None:
        """Remove every object under the request's prefix. A failure is logged, not raised: the row is gone by
        then, and a bucket lifecycle rule (README) removes what a failed delete leaves."""
        if not is_request_id(request_id):
            return
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}{request_id}/")
            keys = [{"Key": obj["Key"]} for page in pages for obj in page.get("Contents", [])]
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start:start + 1000],
                                                                       "Quiet": True})
        except self._errors as exc:
            log.warning("result objects not deleted", extra={"request_id": request_id, "error": str(exc)[:300]})
