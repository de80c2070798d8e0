"""Where a result's images are fetched from, decided in one place: inline bytes, or an expiring URL.

`sync_mode=true` results carry their bytes (in the call, and read back from the store for Result). Otherwise each
image has a URL valid for `ttl_s`: the object store's own presigned URL where results live in one, else this
server's `/results/<id>/<file>` signed with HMAC-SHA256 over request id, file name and expiry (`?expires=<unix s>
&signature=<hex>`) with a key only the server holds, like an object store's presigned URL.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from engine.request import GenerationResult
from protos.pixart.v1 import pixart_pb2 as pb
from server.storage import Row, Store
from server.storage.states import COMPLETED

from . import records
from .work import WorkItem


class ResultSigner:
    """Signed, expiring result URLs."""

    def __init__(self, secret: bytes, ttl_s: float):
        self.secret, self.ttl_s = secret, ttl_s

    def _mac(self, request_id: str, file_name: str, expires: int) -> str:
        message = f"{request_id}/{file_name}/{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def url(self, base: str, request_id: str, file_name: str, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self.ttl_s)
        signature = self._mac(request_id, file_name, expires)
        return f"{base.rstrip('/')}/results/{request_id}/{quote(file_name)}?expires={expires}&signature={signature}"

    def valid(self, request_id: str, file_name: str, expires: str, signature: str) -> bool:
        # ASCII only: str.isdigit() accepts "²", which int() refuses, and compare_digest refuses non-ASCII text
        if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
            return False
        if not (signature.isascii() and len(signature) == 64):
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(self._mac(request_id, file_name, int(expires)), signature)


class ResultLinks:
    def __init__(self, store: Store, signer: ResultSigner, base_url: Callable[[], str]):
        """`base_url`: how callers reach this server's HTTP port (known once it listens)."""
        self.store, self.signer, self.base_url = store, signer, base_url

    def url(self, request_id: str, file_name: str) -> str:
        external = self.store.results.url(request_id, file_name, self.signer.ttl_s)
        if external is not None:
            return external
        return self.signer.url(self.base_url(), request_id, file_name)

    def result(self, item: WorkItem) -> pb.GenerateResult:
        """A live request's result, as its caller gets it."""
        outcome = item.outcome
        assert isinstance(outcome, GenerationResult)
        sync = item.request.sync_mode
        urls = None if sync else [self.url(item.id, img.file_name) for img in outcome.images]
        return records.result_to_proto(outcome, item.id, queue_s=item.queue_s, urls=urls, include_data=sync)

    def stored(self, row: Row) -> pb.GenerateResult:
        """A COMPLETED row's result with its bytes (sync_mode) or fresh URLs (blocking: it may read the store)."""
        result = pb.GenerateResult.FromString(row.result)
        sync = records.sync_mode(pb.GenerateRequest.FromString(row.request))
        for img in result.images:
            if sync:
                img.file_data = self.store.image_bytes(row.id, img.file_name) or b""
            else:
                img.url = self.url(row.id, img.file_name)
        return result

    def servable(self, request_id: str, file_name: str, viewer: str | None = None) -> Path | str | None:
        """The file (or, in object storage, a fresh presigned URL to redirect to) only if a COMPLETED request with
        sync_mode=false names it, and it is `viewer`'s (a tenant's name; None: a signed URL's holder, or an admin):
        sync results never have a URL (blocking: it reads the store)."""
        row = self.store.get(request_id)
        if row is None or row.state != COMPLETED or not row.result or viewer not in (None, row.tenant):
            return None
        if records.sync_mode(pb.GenerateRequest.FromString(row.request)):
            return None
        if file_name not in {img.file_name for img in pb.GenerateResult.FromString(row.result).images}:
            return None
        return self.store.results.url(request_id, file_name, self.signer.ttl_s) or \
            self.store.image_path(request_id, file_name)
