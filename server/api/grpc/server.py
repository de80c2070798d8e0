"""The gRPC port: the PixArt servicer, health, reflection, the interceptors, message limits and TLS, assembled.

Interceptors, outermost first: undecodable bytes are refused whatever the key check says (DecodeGuard), then the
API key (ApiKeyInterceptor). Health says NOT_SERVING until `set_serving(True)`, and again from the first moment of
a drain (`enter_graceful_shutdown`).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc
from server.api.keys import ApiKeys
from server.api.limits import MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES
from server.observability.metrics import Metrics

from .auth import ApiKeyInterceptor
from .guard import DecodeGuard

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PixArt"].full_name


# The methods this port serves: a metric label names one of them or "other", so that calls to made-up method names
# (which need no key to reach the interceptors) cannot add series without bound.
KNOWN_METHODS = frozenset(
    f"/{service.full_name}/{method.name}"
    for service in (pb.DESCRIPTOR.services_by_name["PixArt"], health_pb2.DESCRIPTOR.services_by_name["Health"])
    for method in service.methods)


def _method(full_name: str) -> str:
    return full_name.rsplit("/", 1)[-1] if full_name in KNOWN_METHODS else "other"


class GrpcServer:
    def __init__(self, servicer: pb_grpc.PixArtServicer, *, keys: ApiKeys, metrics: Metrics,
                 tls: tuple[str, str] | None = None):
        """`tls`: (certificate chain, private key) PEM files."""
        interceptors: list[grpc.aio.ServerInterceptor] = [DecodeGuard(
            on_refuse=lambda m: metrics.requests.labels(_method(m), "INVALID_ARGUMENT").inc())]
        if keys.required:
            interceptors.append(ApiKeyInterceptor(
                keys, on_reject=lambda m: metrics.requests.labels(_method(m), "UNAUTHENTICATED").inc()))
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ])
        pb_grpc.add_PixArtServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.tls = tls
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen (health NOT_SERVING); the port bound (port 0 picks one)."""
        await self.set_serving(False)
        address = f"{host}:{port}"
        if self.tls:
            cert, key = self.tls
            creds = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        await self.server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace=grace)
