"""The server's lifecycle: bind, load and warm the engine, work the durable queue, serve, drain, stop.

Health says NOT_SERVING from the moment the port is open until the engine is loaded and warmed up, and again
from the first moment of draining; calls that need the engine get UNAVAILABLE meanwhile.

The durable queue lives in the store, which several replicas may share (PostgreSQL). Every replica runs the same
loop: claim the oldest queued requests while its batcher has room for them, renew the leases of what it holds
(recording progress, and hearing of cancels sent to other replicas), hand back what it has not started when it
drains. Status, Result and Cancel answer from the store for requests that run elsewhere, so any replica answers
for any request. A replica that dies stops renewing; its requests are claimed again once their leases run out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.request import Cancelled, GenerationRequest, GenerationResult, InvalidRequest
from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc

from . import convert
from . import store as st
from .auth import ApiKeyInterceptor
from .batcher import Batcher, Draining, Engine, QueueFull, ShutdownAbort, WorkItem
from .fal import FalApi
from .guard import DecodeGuard
from .http import HttpServer, ResultSigner, build_app
from .metrics import STAGES, Metrics
from .service import PixArtService
from .webhooks import Delivery, WebhookPolicy, WebhookSender, body_json

log = logging.getLogger("pixart.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PixArt"].full_name
# 8 PNGs of 2048x2048 RGB are at most ~8 x 12.6 MB plus framing; 256 MiB leaves room for incompressible data.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_REQUEST_BYTES = 1 * 1024 * 1024  # two 10,000-character prompts are < 100 kB even in 4-byte UTF-8


@dataclass
class Lookup:
    """A request's state for Status/Result calls, whichever transport asks."""

    request_id: str
    state: str
    queue_position: int = 0
    progress: tuple[int, int] = (0, 0)
    logs: list[dict] = field(default_factory=list)
    error: status_pb2.Status | None = None
    row: st.Row | None = None  # the stored row, once it has ended (its result and files)


@dataclass
class ServerConfig:
    engine: str
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = 9464  # stored results, /metrics, /healthz; None: no HTTP server
    public_url: str | None = None  # base of result URLs as callers reach them; default http(s)://host:http_port
    metrics_address: str | None = None  # "host:port": /metrics on its own listener (without a key), not on http_port
    max_queue: int = 64
    max_batch: int = 4
    max_batch_images: int = 4
    max_running_images: int | None = None  # memory budget across size groups; default max_batch_images
    max_wait_ms: float = 10.0  # request-level batching only: how long a batch waits for companions
    batching: str = "continuous"  # or "request": a batch forms while idle and runs to its end
    # Engine.load keywords: variant ("optimized", "fp32", "int8"), intra_op_threads, flagged_images, text_cache_mb
    engine_options: dict[str, Any] = field(default_factory=dict)
    store: str = "artifacts/store"  # a folder (SQLite) or a postgresql:// URL shared by replicas
    results: str | None = None  # folder or s3://bucket/prefix of result images; default <store>/results (SQLite)
    s3_endpoint_url: str | None = None  # an S3-compatible server (MinIO...); default: AWS S3 (boto3's own config)
    s3_region: str | None = None  # the bucket's region; default: boto3's own config
    lease_s: float = 30.0  # how long a claim lasts without renewal: a dead replica's work waits this long
    poll_s: float = 0.25  # how often a replica claims work, renews leases and looks for cancels sent elsewhere
    replica_id: str | None = None  # this replica's name in the store's claims; default host-pid-random
    result_ttl_s: float = 24 * 3600.0
    api_keys: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_s: float = 30.0
    providers: list[str] | None = None
    warmup: bool = True
    port_file: str | None = None  # written once serving, as JSON {"port", "http_port"}: for port 0
    webhook_timeout_s: float = 10.0
    webhook_attempts: int = 5
    webhook_backoff_s: float = 1.0
    webhook_allow: list[str] = field(default_factory=list)  # CIDRs and host names opened to webhooks
    webhook_secret: str | None = None  # signs deliveries; default: a key kept in the store folder
    result_url_ttl_s: float = 3600.0  # how long a signed result URL works
    app_ids: list[str] = field(default_factory=list)  # fal app ids served besides fal-ai/pixart-sigma


class App:
    def __init__(self, config: ServerConfig, engine_loader: Any = None):
        self.config = config
        self._engine_loader = engine_loader
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.draining = False
        self.metrics = Metrics()
        self.store = st.open_store(config.store, config.results,
                                   s3={"endpoint_url": config.s3_endpoint_url, "region": config.s3_region})
        self.replica = config.replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        self.metrics_http: HttpServer | None = None
        self.port = 0
        self.signer = ResultSigner(self.store.secret("url-signing"), config.result_url_ttl_s)
        self.webhook_policy = WebhookPolicy(config.webhook_allow)
        secret = config.webhook_secret.encode() if config.webhook_secret else self.store.secret("webhook-signing")
        self.webhooks = WebhookSender(self.webhook_policy, secret, timeout_s=config.webhook_timeout_s,
                                      attempts=config.webhook_attempts, backoff_s=config.webhook_backoff_s)
        self.fal = FalApi(self, config.app_ids)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliveries: set[asyncio.Task] = set()
        self._delivering: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._claiming = asyncio.Lock()  # one claim at a time; drain waits for the one under way
        self._wake = asyncio.Event()
        # a delivery claim lasts beyond every attempt and backoff, so that only a dead deliverer's is taken over
        self._webhook_lease_s = (config.webhook_attempts * (config.webhook_timeout_s + 1)
                                 + config.webhook_backoff_s * 2 ** config.webhook_attempts + 60)

    # -- start ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the ports (health NOT_SERVING); the engine loads afterwards in load_engine()."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()

        def refused(method: str) -> None:
            self.metrics.requests.labels(method.rsplit("/", 1)[-1][:64], "INVALID_ARGUMENT").inc()

        # outermost first: undecodable bytes are refused whatever the key check says
        interceptors: list[grpc.aio.ServerInterceptor] = [DecodeGuard(on_refuse=refused)]
        if cfg.api_keys:
            interceptors.append(
                ApiKeyInterceptor(
                    cfg.api_keys,
                    on_reject=lambda m: self.metrics.requests.labels(m.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc(),
                )
            )
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ],
        )
        pb_grpc.add_PixArtServicer_to_server(PixArtService(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        healthy = lambda: self.engine is not None and not self.draining  # noqa: E731
        if cfg.metrics_address:
            host, _, port = cfg.metrics_address.rpartition(":")
            self.metrics_http = HttpServer(
                build_app(signer=None, result_file=None, keys=[], render_metrics=self.metrics.render,
                          healthy=healthy),
                host.strip("[]") or cfg.host, int(port))
            await self.metrics_http.start()
        if cfg.http_port is not None:
            app = build_app(signer=self.signer, result_file=self._servable_result, keys=cfg.api_keys,
                            render_metrics=None if cfg.metrics_address else self.metrics.render, healthy=healthy,
                            fal=self.fal)
            self.http = HttpServer(app, cfg.host, cfg.http_port, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key)
            await self.http.start()
        await self.server.start()
        if self.http is not None and not cfg.public_url and cfg.host in ("0.0.0.0", "::", ""):
            log.warning("result URLs name the bind address, which callers cannot reach: set --public-url")
        self._tasks.append(asyncio.create_task(self._expire_loop()))
        log.info("listening", extra={"port": self.port, "http_port": self.http_port, "tls": bool(cfg.tls_cert)})

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    def result_url(self, request_id: str, file_name: str) -> str:
        """The one place that decides a result URL's form: the object store's presigned URL where results live in
        one, else this server's own signed /results URL; either valid for result_url_ttl_s from now."""
        external = self.store.results.url(request_id, file_name, self.config.result_url_ttl_s)
        if external is not None:
            return external
        scheme = "https" if self.http is not None and self.http.tls else "http"
        base = self.config.public_url or (f"{scheme}://{self.config.host}:{self.http_port}" if self.http else "")
        return self.signer.url(base, request_id, file_name)

    async def _servable_result(self, request_id: str, file_name: str) -> Path | str | None:
        return await asyncio.to_thread(self._result_file, request_id, file_name)

    def _result_file(self, request_id: str, file_name: str) -> Path | str | None:
        """The file (or, in object storage, a fresh presigned URL to redirect to) only if a COMPLETED request with
        sync_mode=false names it: sync results never have a URL."""
        row = self.store.get(request_id)
        if row is None or row.state != st.COMPLETED or not row.result:
            return None
        request = pb.GenerateRequest.FromString(row.request)
        if not request.HasField("sync_mode") or request.sync_mode:
            return None
        if file_name not in {img.file_name for img in pb.GenerateResult.FromString(row.result).images}:
            return None
        return self.store.results.url(request_id, file_name, self.config.result_url_ttl_s) or \
            self.store.image_path(request_id, file_name)

    async def load_engine(self) -> None:
        cfg = self.config
        t0 = time.monotonic()
        if self._engine_loader is None:
            from engine import Engine  # imported here: the server's own modules stay importable without it

            self._engine_loader = Engine.load
        engine = await asyncio.to_thread(self._engine_loader, cfg.engine, cfg.providers, **cfg.engine_options)
        if cfg.warmup:
            await asyncio.to_thread(engine.warmup)
        if self.draining:  # SIGTERM arrived while loading: nothing was scheduled, the store keeps the queue
            return
        self.batcher = Batcher(
            engine,
            max_queue=cfg.max_queue,
            max_batch=cfg.max_batch,
            max_batch_images=cfg.max_batch_images,
            max_running_images=cfg.max_running_images,
            max_wait_s=cfg.max_wait_ms / 1000.0,
            continuous=cfg.batching == "continuous",
            on_start=self._on_start,
            on_finish=self._on_finish,
            metrics=self.metrics,
        )
        if isinstance(self.store, st.SqliteStore):
            await asyncio.to_thread(self.store.forget_claims)
        if self.draining:  # SIGTERM while starting: the store keeps the queue for the next start
            return
        self.batcher.start()
        self.engine = engine
        await self._claim()
        self._tasks.append(asyncio.create_task(self._work_loop()))
        if not self.draining:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"load_s": round(time.monotonic() - t0, 3)})
        if cfg.port_file:
            Path(cfg.port_file).write_text(json.dumps({"port": self.port, "http_port": self.http_port}))

    # -- the shared queue: claims, leases, cancels from elsewhere ---------------------------------------------
    async def _claim(self) -> None:
        """Take as many queued requests as the batcher has room to start soon (max_batch waiting here at most),
        so that the rest stay in the shared queue for other replicas."""
        async with self._claiming:
            if self.draining or self.batcher is None:
                return
            room = min(self.config.max_batch, self.config.max_queue) - len(self.batcher.pending)
            if room <= 0:
                return
            rows = await asyncio.to_thread(self.store.claim, self.replica, room, self.config.lease_s)
            if rows:
                await asyncio.to_thread(self._take, rows)

    def _take(self, rows: list[st.Row]) -> None:
        """Queue claimed requests here: cancelled ones end, ones the engine now refuses fail visibly."""
        for row in rows:
            job = WorkItem(convert.request_from_proto(pb.GenerateRequest.FromString(row.request)), durable=True,
                           request_bytes=row.request, webhook_url=row.webhook_url, id=row.id, claim=row.attempt)
            if row.cancel_requested:  # cancelled while queued elsewhere or while a replica that died ran it
                self.batcher.complete(job, Cancelled())
                continue
            violations = self.batcher.engine.violations(job.request)
            if violations:  # the engine changed under a stored request: it fails, visibly
                self.batcher.complete(job, InvalidRequest(violations))
                continue
            if row.attempt > 1:
                job.add_log("recovered: it was claimed before by a replica that stopped (a server restart)")
                log.info("recovered", extra={"request_id": row.id, "attempt": row.attempt})
            self.batcher.submit(job, force=True)

    async def _renew(self) -> None:
        """Keep the leases of what runs or waits here, publish its progress, and stop what was cancelled through
        another replica (or what this replica lost: its lease ran out and someone else took it)."""
        mine = [item for item in list(self.batcher.items.values()) if item.durable]
        if not mine:
            return
        progress = {item.id: item.progress for item in mine if item.state == st.IN_PROGRESS}
        held, cancelled = await asyncio.to_thread(self.store.renew, self.replica, self.config.lease_s, progress)
        for item in mine:
            if item.id in cancelled:
                self.batcher.cancel(item.id)
            elif item.id not in held and self.batcher.items.get(item.id) is item:
                log.warning("lost the claim (lease ran out); stopping", extra={"request_id": item.id})
                self.batcher.cancel(item.id)

    async def _work_loop(self) -> None:
        """Every poll_s: claim, renew; now and then look for undelivered webhooks and the shared queue's depth."""
        next_sweep = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._claim()
                await self._renew()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + max(1.0, min(10.0, self.config.lease_s / 3))
                    self.metrics.store_queue_depth.set(await asyncio.to_thread(self.store.queued))
                    for row in await asyncio.to_thread(self.store.pending_webhooks):
                        self._schedule_webhook(row.id)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be away for a moment: keep trying, the leases say what is whose
                log.exception("queue work failed")

    # -- the worker thread's callbacks ----------------------------------------------------------------------
    def _on_start(self, jobs: list[WorkItem]) -> None:
        for job in jobs:
            if job.durable and not self.store.set_running(job.id, self.replica, job.claim):
                log.warning("lost the claim before it started; stopping", extra={"request_id": job.id})
                job.cancel_requested = True

    def _on_finish(self, job: WorkItem, state: str, outcome: BaseException | None = None) -> None:
        outcome = outcome if outcome is not None else job.outcome
        if isinstance(outcome, ShutdownAbort) and job.durable:
            return  # left IN_PROGRESS in the store and handed back by drain(): it runs again, here or elsewhere
        self.metrics.outcomes.labels(state).inc()
        result_bytes = error_bytes = None
        images: list[tuple[str, bytes]] = []
        if isinstance(outcome, GenerationResult):
            self.metrics.images.inc(len(outcome.images))
            for stage in STAGES:
                if stage in outcome.timings:
                    self.metrics.stage_seconds.labels(stage).observe(outcome.timings[stage])
            stored = convert.result_to_proto(outcome, job.id, queue_s=job.queue_s, include_data=False)
            result_bytes = stored.SerializeToString()
            if job.durable or not job.request.sync_mode:
                images = [(img.file_name, img.data) for img in outcome.images]
        else:
            error_bytes = convert.outcome_status(outcome).SerializeToString()
        if job.durable or images:
            recorded = self.store.finish(
                job.id,
                state,
                request=job.request_bytes or convert.request_to_proto(job.request).SerializeToString(),
                owner=self.replica if job.durable else None,
                attempt=job.claim,
                result=result_bytes,
                images=images,
                error=error_bytes,
                logs=job.logs,
            )
            if not recorded:  # another replica took the request over (or it ended): its outcome is the one kept
                log.warning("outcome refused: the claim was lost", extra={"request_id": job.id, "state": state})
                return
        log.info("ended", extra={"request_id": job.id, "state": state, "queue_s": round(job.queue_s, 4)})
        if job.webhook_url:
            self._schedule_webhook(job.id)

    # -- queue helpers used by the service ------------------------------------------------------------------
    def stored_result(self, row: st.Row) -> pb.GenerateResult:
        result = pb.GenerateResult.FromString(row.result)
        request = pb.GenerateRequest.FromString(row.request)
        sync = request.sync_mode if request.HasField("sync_mode") else True
        for img in result.images:
            if sync:
                img.file_data = self.store.image_bytes(row.id, img.file_name) or b""
            else:
                img.url = self.result_url(row.id, img.file_name)
        return result

    # -- the durable queue, as every transport sees it -----------------------------------------------------
    async def submit(self, request: GenerationRequest, webhook_url: str = "", origin: str = "grpc",
                     request_bytes: bytes | None = None) -> tuple[str, int]:
        """Store a validated request in the shared queue; (id, queue position). Raises QueueFull (max_queue
        requests wait in the store) or Draining. The row is committed before the id is returned; this replica
        then claims work at once if it has room (whichever replica has room runs it)."""
        if self.draining or self.batcher is None:
            raise Draining()
        data = request_bytes or convert.request_to_proto(request).SerializeToString()
        request_id = st.new_request_id()

        def add() -> None:
            if self.store.queued() >= self.config.max_queue:
                raise QueueFull()
            self.store.add(request_id, data, webhook_url, origin)

        await asyncio.to_thread(add)
        log.info("accepted", extra={"request_id": request_id, "origin": origin})
        await self._claim()
        item = self.batcher.items.get(request_id)
        position = self.batcher.position(item) if item is not None else None
        if position is None:
            position = 0 if item is not None else await asyncio.to_thread(self.store.position, request_id)
        return request_id, position

    async def lookup(self, request_id: str) -> Lookup | None:
        """Where a request is: live in this replica's batcher, or in the store (wherever it runs); None when
        unknown or expired."""
        item = self.batcher.items.get(request_id) if self.batcher else None
        if item is not None and item.state in (st.IN_QUEUE, st.IN_PROGRESS):
            position = self.batcher.position(item) if item.state == st.IN_QUEUE else None
            return Lookup(item.id, str(item.state), position or 0, item.progress, list(item.logs))
        row = await asyncio.to_thread(self.store.get, request_id)
        if row is None:
            return None
        if row.state == st.IN_QUEUE:
            position = await asyncio.to_thread(self.store.position, request_id)
            return Lookup(row.id, row.state, position, (0, 0), row.logs)
        if row.state == st.IN_PROGRESS:
            return Lookup(row.id, row.state, 0, row.progress, row.logs)
        error = status_pb2.Status.FromString(row.error) if row.error else None
        return Lookup(row.id, row.state, 0, (0, 0), row.logs, error, row)

    async def cancel(self, request_id: str) -> str:
        """"queued" (it will not run), "running" (it stops at its next step, here or on the replica that runs
        it, and stays cancelled across a crash), "ended" (already in a final state) or "unknown"."""
        item = self.batcher.items.get(request_id) if self.batcher else None
        if item is not None and item.durable:
            # committed before the answer: a crash after "cancellation requested" must not run it again
            await asyncio.to_thread(self.store.request_cancel, request_id)
        outcome = self.batcher.cancel(request_id) if self.batcher else None
        if outcome is not None:
            return outcome
        row = await asyncio.to_thread(self.store.get, request_id)
        if row is None:
            return "unknown"
        if row.state in st.TERMINAL:
            return "ended"
        # not here: the flag first, so that whichever replica holds or next claims it sees it
        if not await asyncio.to_thread(self.store.request_cancel, request_id):
            return "ended"
        line = {"message": "canceled", "level": "INFO", "timestamp": time.time()}
        if await asyncio.to_thread(self.store.cancel_queued, request_id, [*row.logs, line]):
            self.metrics.outcomes.labels(st.CANCELED).inc()
            if row.webhook_url:
                self._schedule_webhook(request_id)
            return "queued"
        self._wake.set()
        return "running"

    # -- webhooks -------------------------------------------------------------------------------------------
    def _schedule_webhook(self, request_id: str) -> None:
        """Deliver the end of a request to its webhook (from any thread); undelivered ones resume at the next start."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_delivery, request_id)

    def _start_delivery(self, request_id: str) -> None:
        if request_id in self._delivering:  # scheduled twice (recovery, then the pending list): deliver once
            return
        self._delivering.add(request_id)
        task = asyncio.create_task(self._deliver(request_id))
        self._deliveries.add(task)
        task.add_done_callback(lambda t: (self._deliveries.discard(t), self._delivering.discard(request_id)))

    async def _deliver(self, request_id: str) -> None:
        claimed = await asyncio.to_thread(self.store.claim_webhook, request_id, self.replica, self._webhook_lease_s)
        if not claimed:  # delivered, or being delivered by another replica
            return
        row = await asyncio.to_thread(self.store.get, request_id)
        if row is None or not row.webhook_url or row.webhook_done:
            return
        body = body_json(await asyncio.to_thread(self._webhook_payload, row))
        await self.webhooks.deliver(Delivery(row.id, row.webhook_url, body))
        # done either way: delivered, refused, or every retry spent (the receiver's trouble must not become ours)
        await asyncio.to_thread(self.store.mark_webhook_done, row.id)

    def _webhook_payload(self, row: st.Row) -> dict[str, Any]:
        if row.origin == "fal":
            return self.fal.webhook_payload(row)
        body: dict[str, Any] = {"request_id": row.id, "status": row.state, "payload": None, "error": None}
        if row.state == st.COMPLETED and row.result:
            body["payload"] = convert.result_to_json(self.stored_result(row))
        if row.error:
            err = status_pb2.Status.FromString(row.error)
            body["error"] = {"code": convert.grpc_code(err).name, "message": err.message}
        return body

    async def _expire_loop(self) -> None:
        period = max(1.0, min(60.0, self.config.result_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                n = await asyncio.to_thread(self.store.expire, self.config.result_ttl_s)
                if n:
                    log.info("expired results", extra={"count": n})
            except Exception:
                log.exception("expiry failed")

    # -- stop -----------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """SIGTERM: stop accepting, give back what is queued, finish what runs within the grace period, stop."""
        if self.draining:
            return
        self.draining = True
        log.info("draining", extra={"grace_s": self.config.grace_s})
        await self.health.enter_graceful_shutdown()
        async with self._claiming:  # a claim under way lands before the queue is handed back
            pass
        if self.batcher is not None:
            unstarted = []
            for job in self.batcher.stop_accepting():
                if job.durable:
                    unstarted.append(job.id)  # still IN_QUEUE in the store
                    continue
                self.batcher.complete(job, ShutdownAbort())
            # handed back now, not when their leases run out: another replica (or the next start) runs them
            await asyncio.to_thread(self.store.release, self.replica, unstarted)
            finished = await asyncio.to_thread(self.batcher.wait_idle, self.config.grace_s)
            if not finished:
                log.warning("grace period over; stopping the running batch")
                self.batcher.abort_running()
                await asyncio.to_thread(self.batcher.wait_idle, 30.0)
            await asyncio.to_thread(self.store.release, self.replica)  # what the grace period stopped
        await self.stop()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        for task in self._tasks:
            task.cancel()
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.join, 5.0)
        if self._deliveries:  # a few seconds for deliveries under way; the rest resume at the next start
            _, pending = await asyncio.wait(set(self._deliveries), timeout=5.0)
            for task in pending:
                task.cancel()
        self.webhooks.executor.shutdown(wait=False, cancel_futures=True)
        for http in (self.http, self.metrics_http):
            if http is not None:
                await http.stop()
        self.store.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
