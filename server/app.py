"""The composition root: build the server's parts from its settings, start them in order, stop them in order.

    start()        the ports open; health NOT_SERVING, calls that need the engine get UNAVAILABLE
    load_engine()  the engine loads and warms up; the engine loop and this replica's claims start; SERVING
    drain()        SIGTERM: NOT_SERVING, stop accepting, hand back what waits, let what runs finish within the grace
                   period, then stop()

Nothing here handles a request: the transports (server/api) call the request service (server/core/service.py), the
scheduler decides, the engine loop executes, the output side records; see docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from server.api.grpc.server import GrpcServer
from server.api.grpc.servicer import PixArtServicer
from server.api.http.fal import FalApi
from server.api.http.fal_routes import mount as mount_fal
from server.api.http.guard import ConnectionGuard, ConnectionLimits
from server.api.http.openai import OpenAIApi
from server.api.http.openai import mount as mount_openai
from server.api.http.playground import mount as mount_playground
from server.api.http.server import HttpServer, build_app
from server.api.keys import ApiKeys, load_keys
from server.config import ServerConfig
from server.core.deliveries import WebhookDeliveries
from server.core.engine_loop import Engine, EngineLoop
from server.core.links import ResultLinks, ResultSigner
from server.core.outputs import Outputs
from server.core.replica import Replica, ReplicaConfig
from server.core.scheduler import Scheduler, SchedulerConfig
from server.core.service import RequestService
from server.core.work import ShutdownAbort
from server.observability.metrics import Metrics
from server.storage import open_store
from server.webhooks import WebhookPolicy, WebhookSender

log = logging.getLogger("pixart.server")


def load_engine(export_dir: str, providers: list[str] | None, **options: Any) -> Engine:
    from engine import Engine  # imported here: the server's own modules stay importable without ONNX Runtime

    return Engine.load(export_dir, providers, **options)


class App:
    def __init__(self, config: ServerConfig, engine_loader: Any = load_engine):
        self.config = cfg = config
        self._engine_loader = engine_loader
        self.metrics = Metrics()
        self.store = open_store(cfg.store, cfg.results, s3={"endpoint_url": cfg.s3_endpoint_url,
                                                            "region": cfg.s3_region})
        self.replica_name = cfg.replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = ApiKeys(load_keys(cfg.api_keys, cfg.api_keys_file))
        self.signer = ResultSigner(self.store.secret("url-signing"), cfg.result_url_ttl_s)
        self.links = ResultLinks(self.store, self.signer, self._base_url)
        policy = WebhookPolicy(cfg.webhook_allow)
        secret = cfg.webhook_secret.encode() if cfg.webhook_secret else self.store.secret("webhook-signing")
        sender = WebhookSender(policy, secret, timeout_s=cfg.webhook_timeout_s, attempts=cfg.webhook_attempts,
                               backoff_s=cfg.webhook_backoff_s)
        self.webhooks = WebhookDeliveries(self.store, sender, self.links, replica=self.replica_name)
        self.outputs = Outputs(self.store, replica=self.replica_name, metrics=self.metrics, webhooks=self.webhooks)
        self.service = RequestService(self.store, self.outputs, self.links, self.webhooks, policy, self.metrics,
                                      max_queue=cfg.max_queue, limits=self.keys.limits)
        self.fal = FalApi(self.service, keys=self.keys, app_ids=cfg.app_ids, public_url=cfg.public_url,
                          max_streams=cfg.http_max_streams_per_key)
        self.webhooks.payloads["fal"] = self.fal.webhook_payload
        self.grpc = GrpcServer(PixArtServicer(self.service, self.metrics, self.keys), keys=self.keys,
                               metrics=self.metrics,
                               tls=cfg.tls)
        self.http: HttpServer | None = None
        self.metrics_http: HttpServer | None = None
        self.loop: EngineLoop | None = None
        self.replica: Replica | None = None
        self.port = 0
        self._stopped = asyncio.Event()

    # -- start -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the ports (health NOT_SERVING); the engine loads afterwards in load_engine()."""
        cfg = self.config
        self.outputs.bind(asyncio.get_running_loop())
        self.port = await self.grpc.start(cfg.host, cfg.port)
        if cfg.metrics_address:
            host, _, port = cfg.metrics_address.rpartition(":")
            app = build_app(keys=ApiKeys(), healthy=lambda: self.service.ready, render_metrics=self.metrics.render)
            self.metrics_http = HttpServer(app, host.strip("[]") or cfg.host, int(port), guard=self._http_guard())
            await self.metrics_http.start()
        if cfg.http_port is not None:
            app = build_app(keys=self.keys, healthy=lambda: self.service.ready, signer=self.signer,
                            cors_origins=cfg.cors_origins,
                            result_file=self._servable, render_metrics=None if cfg.metrics_address
                            else self.metrics.render)
            mount_fal(self.fal, app)
            mount_openai(OpenAIApi(self.service, keys=self.keys, app_ids=set(self.fal.app_ids)), app)
            mount_playground(app)
            tls = cfg.tls or (None, None)
            self.http = HttpServer(app, cfg.host, cfg.http_port, guard=self._http_guard(), tls_cert=tls[0],
                                   tls_key=tls[1])
            await self.http.start()
            if not cfg.public_url and cfg.host in ("0.0.0.0", "::", ""):
                log.warning("result URLs name the bind address, which callers cannot reach: set --public-url")
        log.info("listening", extra={"port": self.port, "http_port": self.http_port, "tls": bool(cfg.tls)})

    def _http_guard(self) -> ConnectionGuard:
        cfg = self.config
        limits = ConnectionLimits(cfg.http_max_connections, cfg.http_max_connections_per_address,
                                  cfg.http_header_timeout_s, cfg.http_body_timeout_s, cfg.http_write_timeout_s)
        return ConnectionGuard(limits, on_cut=lambda reason: self.metrics.http_cut.labels(reason).inc())

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    @property
    def draining(self) -> bool:
        return self.service.draining

    def _base_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url
        if self.http is None:
            return ""
        return f"{'https' if self.http.tls else 'http'}://{self.config.host}:{self.http_port}"

    async def _servable(self, request_id: str, file_name: str, viewer: str | None) -> Path | str | None:
        return await asyncio.to_thread(self.links.servable, request_id, file_name, viewer)

    async def load_engine(self) -> None:
        cfg = self.config
        t0 = time.monotonic()
        engine = await asyncio.to_thread(self._engine_loader, cfg.engine, cfg.providers, **cfg.engine_options)
        if cfg.warmup:
            await asyncio.to_thread(engine.warmup)
        if self.draining:  # SIGTERM arrived while loading: nothing was scheduled, the store keeps the queue
            engine.close()
            return
        scheduler = Scheduler(SchedulerConfig(
            max_queue=cfg.max_queue, max_batch=cfg.max_batch, max_batch_images=cfg.max_batch_images,
            max_running_images=cfg.max_running_images, max_wait_s=cfg.max_wait_ms / 1000.0,
            continuous=cfg.batching == "continuous"))
        self.loop = EngineLoop(engine, scheduler, self.outputs.report)
        self.outputs.on_lost_claim = self.loop.cancel
        self.replica = Replica(self.store, self.loop, self.outputs, self.webhooks, self.metrics, ReplicaConfig(
            name=self.replica_name, lease_s=cfg.lease_s, poll_s=cfg.poll_s,
            claim_ahead=min(cfg.max_batch, cfg.max_queue), result_ttl_s=cfg.result_ttl_s), self.service.violations,
            on_store=self._store_reachable)
        self.service.attach(self.loop, self.replica)
        self.loop.start()
        await self.replica.start()
        if not self.draining:
            await self.grpc.set_serving(True)
        log.info("serving", extra={"load_s": round(time.monotonic() - t0, 3)})
        if self.http is not None:  # the first thing a newcomer opens
            log.info(f"playground: {self._base_url()}/", extra={"url": f"{self._base_url()}/"})
        if cfg.port_file:  # renamed into place: whoever polls for the file never reads half of it
            tmp = Path(f"{cfg.port_file}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"port": self.port, "http_port": self.http_port}))
            os.replace(tmp, cfg.port_file)

    async def _store_reachable(self, reachable: bool) -> None:
        """The replica's queue work found the store away, or back: new work and health follow."""
        self.service.store_reachable = reachable
        if not self.draining:
            await self.grpc.set_serving(self.service.ready)

    # -- stop ------------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """SIGTERM: stop accepting, give back what is queued, finish what runs within the grace period, stop."""
        if self.draining:
            return
        self.service.draining = True
        log.info("draining", extra={"grace_s": self.config.grace_s})
        await self.grpc.enter_graceful_shutdown()
        if self.loop is not None:
            await self.replica.stop_claiming()
            unstarted = self.loop.stop_accepting()
            for item in unstarted:
                if not item.durable:  # a caller waits on it: it is told the server shut down
                    await self.outputs.complete(item, ShutdownAbort())
            await self.replica.hand_back([item for item in unstarted if item.durable])
            if not await asyncio.to_thread(self.loop.wait_idle, self.config.grace_s):
                log.warning("grace period over; stopping the running batch")
                self.loop.abort_running()
                await asyncio.to_thread(self.loop.wait_idle, 30.0)
            await self.outputs.settle(30.0)  # what finished is recorded before its claim goes back
            await self.replica.release_all()  # what the grace period stopped runs again, here or elsewhere
        await self.stop()

    async def stop(self) -> None:
        await self.grpc.stop(grace=1.0)
        if self.replica is not None:
            await self.replica.close()
        if self.loop is not None:
            await asyncio.to_thread(self.loop.stop, 5.0)
        await self.outputs.settle()
        await self.webhooks.stop()
        for http in (self.http, self.metrics_http):
            if http is not None:
                await http.stop()
        await asyncio.to_thread(self.store.close)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
