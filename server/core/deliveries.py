"""Webhook deliveries: who delivers the end of a request to its webhook, and what the body says.

A delivery is claimed in the store like the work itself (a lease longer than every attempt and backoff), so among
replicas one delivers it, and one whose deliverer died is taken over. Deliveries scheduled at an outcome start at
once; the rest (left by a restart, or by a replica that died) are found by `sweep`. The body depends on the API the
request came through: `payloads` maps an origin ("fal") to its builder; others get this service's own JSON.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from google.rpc import status_pb2

from server.storage import Row, Store
from server.storage.states import COMPLETED
from server.webhooks import RESOLVE_TIMEOUT_S, Delivery, WebhookSender, body_json

from . import records
from .links import ResultLinks

log = logging.getLogger("pixart.server.webhooks")
Payload = Callable[[Row], dict[str, Any]]
MAX_WEBHOOK_BYTES = 16 << 20  # a body past this leaves the images out (sync_mode results carry them as data)


class WebhookDeliveries:
    def __init__(self, store: Store, sender: WebhookSender, links: ResultLinks, *, replica: str,
                 payloads: Mapping[str, Payload] | None = None):
        self.store, self.sender, self.links, self.replica = store, sender, links, replica
        self.payloads = dict(payloads or {})
        # a delivery claim lasts beyond every attempt and backoff, so that only a dead deliverer's is taken over
        # (each attempt: a bounded lookup, a connect and an exchange each bounded by the attempt's timeout)
        self.lease_s = (sender.attempts * (RESOLVE_TIMEOUT_S + 2 * sender.timeout_s + 1)
                        + sender.backoff_s * 2 ** sender.attempts + 60)
        self._running: dict[str, asyncio.Task] = {}

    def schedule(self, request_id: str) -> None:
        """Deliver the end of a request (on the event loop); scheduled twice, it is delivered once."""
        if request_id in self._running:
            return
        task = asyncio.ensure_future(self._deliver(request_id))
        self._running[request_id] = task
        task.add_done_callback(lambda _t: self._running.pop(request_id, None))

    async def sweep(self) -> None:
        """Schedule the deliveries nobody is making (left by a restart, or by a deliverer that died)."""
        for row in await asyncio.to_thread(self.store.pending_webhooks):
            self.schedule(row.id)

    async def stop(self, timeout: float = 5.0) -> None:
        """A few seconds for deliveries under way; the rest resume at the next start."""
        if self._running:
            _, pending = await asyncio.wait(set(self._running.values()), timeout=timeout)
            for task in pending:
                task.cancel()
        self.sender.executor.shutdown(wait=False, cancel_futures=True)

    async def _deliver(self, request_id: str) -> None:
        claimed = await asyncio.to_thread(self.store.claim_webhook, request_id, self.replica, self.lease_s)
        if not claimed:  # delivered, or being delivered by another replica
            return
        row = await asyncio.to_thread(self.store.get, request_id)
        if row is None or not row.webhook_url or row.webhook_done:
            return
        body = await asyncio.to_thread(self.body, row)  # megabytes of base64 and JSON: not the loop's work
        await self.sender.deliver(Delivery(row.id, row.webhook_url, body))
        # done either way: delivered, refused, or every retry spent (the receiver's trouble must not become ours)
        await asyncio.to_thread(self.store.mark_webhook_done, row.id)

    def body(self, row: Row) -> bytes:
        """The JSON body (blocking). A sync_mode result carries its images as data, up to ~130 MB: past
        MAX_WEBHOOK_BYTES the images are left out (`images_omitted`), and the receiver fetches the result with its
        key, so that no delivery holds (and retries) a body that size."""
        body = body_json(self.payload(row))
        if len(body) <= MAX_WEBHOOK_BYTES:
            return body
        payload = self.payload(row)
        result = payload.get("payload") if isinstance(payload.get("payload"), dict) else None
        if result is not None and isinstance(result.get("images"), list):
            result["images"] = []
            result["images_omitted"] = f"the images were larger than {MAX_WEBHOOK_BYTES >> 20} MB: fetch the result"
        return body_json(payload)

    def payload(self, row: Row) -> dict[str, Any]:
        """The body for an ended request (blocking: a sync_mode result's bytes are read from the store)."""
        if row.origin in self.payloads:
            return self.payloads[row.origin](row)
        body: dict[str, Any] = {"request_id": row.id, "status": row.state, "payload": None, "error": None}
        if row.state == COMPLETED and row.result:
            body["payload"] = records.result_to_json(self.links.stored(row))
        if row.error:
            err = status_pb2.Status.FromString(row.error)
            body["error"] = {"code": records.grpc_code(err).name, "message": err.message}
        return body
