"""Prometheus metrics, on a registry of their own so that several servers can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STAGES = ("text_encoding", "denoising", "decoding", "safety", "image_encoding", "total")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pixart_requests", "gRPC calls by method and final status code", ["method", "code"], registry=r
        )
        self.queue_seconds = Histogram(
            "pixart_queue_seconds", "Time from acceptance to the start of work", buckets=_TIME_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "pixart_stage_seconds", "Engine time per stage and request", ["stage"], buckets=_TIME_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "pixart_batch_size", "Requests stepped together, one observation per denoising step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )
        self.queue_depth = Gauge("pixart_queue_depth", "Requests waiting for the engine", registry=r)
        # the same figure on every replica of one store: what a HorizontalPodAutoscaler scales on
        self.store_queue_depth = Gauge("pixart_store_queue_depth",
                                       "Durable requests waiting in the shared store (all replicas)", registry=r)
        self.images = Counter("pixart_images_generated", "Images generated", registry=r)
        self.row_steps = Counter("pixart_row_steps", "Transformer row-steps of completed requests: computed by the "
                                 "model, or taken from the step cache", ["kind"], registry=r)
        self.outcomes = Counter("pixart_request_outcomes", "Requests ended, by final state", ["state"], registry=r)
        # per tenant (an API key's name; "anonymous" without keys): the names are configured, so the series are few
        self.tenant_outcomes = Counter("pixart_tenant_requests", "Requests ended, by tenant and final state",
                                       ["tenant", "state"], registry=r)
        self.tenant_images = Counter("pixart_tenant_images", "Images generated, by tenant", ["tenant"], registry=r)
        self.tenant_queue_seconds = Histogram("pixart_tenant_queue_seconds", "Time from acceptance to the start of "
                                              "work, by tenant", ["tenant"], buckets=_TIME_BUCKETS, registry=r)
        self.result_write_failures = Counter(
            "pixart_result_write_failures", "Requests whose images could not be stored (results folder or object "
            "store): each ended FAILED", registry=r)

        self.http_cut = Counter("pixart_http_connections_cut", "HTTP connections closed by the port's bounds: too "
                                "many, headers or body too slow, a response not read", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
