"""The server's settings, each declared once: a field of `ServerConfig` with its default and help.

`pixart serve`'s flags and their `PIXART_<FLAG>` environment variables (dashes as underscores, e.g. --max-queue ->
PIXART_MAX_QUEUE) are generated from the fields (`add_arguments`, `from_args`); a flag on the command line wins over
the variable, which wins over the default. List settings take a comma-separated variable and repeated flags.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from engine.memory import PLANS
from engine.vocabulary import (
    DEFAULT_STEP_CACHE,
    DEFAULT_STEP_CACHE_MECHANISM,
    FLAGGED_IMAGE_MODES,
    STEP_CACHE_MECHANISMS,
    STEP_CACHE_MODES,
)


def optional_port(text: str) -> int | None:
    """A port; "off" (or a negative number) disables the listener."""
    if str(text).lower() in ("off", "none", "") or int(text) < 0:
        return None
    return int(text)


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _setting(default: Any, help: str, *, flag: str | None = None, kind: Any = None, **more: Any) -> Any:
    """A field that is also a `serve` flag. `kind`: parses a flag or variable value (default: the default's type);
    `more`: argparse keywords (choices, metavar), `aliases`, `env` (more variables read, in order, after
    PIXART_<FLAG>), `negate` (a boolean set false by the flag)."""
    meta = {"help": help, "flag": flag, "kind": kind, **more}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServerConfig:
    engine: str = _setting(None, "export folder of the model to serve", required=True)
    host: str = _setting("127.0.0.1", "address to bind gRPC and HTTP to")
    port: int = _setting(50051, "gRPC port; 0 picks a free one")
    http_port: int | None = _setting(
        9464, "HTTP port for stored results (signed URLs), /metrics and /healthz; 0 picks a free one, 'off' "
        "disables. TLS with --tls-cert/--tls-key as gRPC", kind=optional_port, aliases=["--metrics-port"],
        env=["PIXART_METRICS_PORT"])
    public_url: str | None = _setting(
        None, "base URL under which callers reach the HTTP port (result URLs); default http(s)://host:port")
    metrics_address: str | None = _setting(
        None, "HOST:PORT: serve /metrics there, on its own listener without a key (bind it to an internal address), "
        "instead of on the HTTP port, where it needs an API key when keys are configured")
    http_max_connections: int = _setting(
        1024, "HTTP connections open at once; past it a new one is answered 503 and closed before anything is read")
    http_max_connections_per_address: int = _setting(
        128, "HTTP connections from one client address (0: no limit; raise it behind a proxy that pools)")
    http_header_timeout_s: float = _setting(
        10.0, "seconds a request's headers may take to arrive, however slowly they trickle",
        flag="--http-header-timeout")
    http_body_timeout_s: float = _setting(30.0, "seconds a request's body may take to arrive after its headers",
                                          flag="--http-body-timeout")
    http_write_timeout_s: float = _setting(60.0, "seconds a response may wait on a client that does not read it",
                                           flag="--http-write-timeout")
    http_max_streams_per_key: int = _setting(
        32, "status streams open at once per API key (per client address without keys); past it 429")
    cors_origins: list[str] = _setting(
        [], "an origin whose pages may call the HTTP API from a browser (repeatable; default none)",
        flag="--cors-origin", metavar="ORIGIN")
    app_ids: list[str] = _setting(
        [], "fal app id served on the HTTP port besides fal-ai/pixart-sigma (repeatable)", flag="--app-id",
        metavar="OWNER/NAME")
    result_url_ttl_s: float = _setting(
        3600.0, "seconds a signed result URL stays valid (a Result call signs fresh ones)", flag="--result-url-ttl")
    webhook_allow: list[str] = _setting(
        [], "open webhooks to a network or host that the default policy refuses (loopback, private, link-local...);"
        " repeatable; PIXART_WEBHOOK_ALLOW takes a comma-separated list", metavar="CIDR|HOST")
    webhook_secret: str | None = _setting(
        None, "key that signs webhook deliveries (X-Pixart-Signature); default: a random key kept in the store "
        "folder as webhook-signing.key")
    webhook_timeout_s: float = _setting(10.0, "seconds one webhook delivery attempt may take",
                                        flag="--webhook-timeout")
    webhook_attempts: int = _setting(5, "delivery attempts per webhook (exponential backoff between them)")
    webhook_backoff_s: float = _setting(1.0, "seconds before the second delivery attempt; doubled before each next",
                                        flag="--webhook-backoff")
    max_queue: int = _setting(64, "requests that may wait; past it RESOURCE_EXHAUSTED")
    max_batch: int = _setting(4, "requests stepped together (per size bin)")
    max_batch_images: int = _setting(4, "images stepped together per size bin (num_images summed)")
    max_running_images: int | None = _setting(
        None, "memory budget: images in flight across all size bins (default --max-batch-images)", kind=int)
    batching: str = _setting(
        "continuous", "continuous: requests join and leave running batches at step boundaries; request: a batch "
        "forms while idle and runs to its end", choices=("continuous", "request"))
    max_wait_ms: float = _setting(
        10.0, "request-level batching: how long the oldest waiting request may wait for batch companions")
    variant: str | None = _setting(None, "graph set of the export: optimized (default when present), fp32, int8")
    intra_op_threads: int = _setting(0, "ONNX Runtime threads per session (0: one per core)")
    flagged_images: str = _setting("black", "what the safety checker does to a flagged image",
                                   choices=FLAGGED_IMAGE_MODES)
    step_cache: str = _setting(
        DEFAULT_STEP_CACHE, "step-cache mode of requests that name none: off computes every step; balanced and fast "
        "skip a row's transformer work on steps predicted to change little (README 'Step caching')",
        choices=STEP_CACHE_MODES)
    step_cache_mechanism: str = _setting(
        DEFAULT_STEP_CACHE_MECHANISM, "how cached rows skip work: forecast skips the whole transformer call and "
        "forecasts its output; blocks runs the first block(s) and reuses the rest's cached residual (needs an export "
        "with the transformer's parts, `pixart export --head-blocks`)", choices=STEP_CACHE_MECHANISMS)
    text_cache_mb: float = _setting(256.0, "memory for cached prompt embeddings")
    text_cache_dir: str | None = _setting(
        None, "also keep prompt embeddings on disk here, across restarts (the edge plans: <store>/text-cache)")
    memory_budget: float | None = _setting(
        None, "pick the fastest memory plan whose estimated peak fits this many GiB (default, fp16, edge, "
        "edge-int4; see README 'Memory'); the choice is logged", kind=float, metavar="GIB")
    memory_plan: str | None = _setting(
        None, "use this memory plan (edge: fp16 transformer, int8 T5 on the CPU loaded per encode, tiled VAE, "
        "embeddings cached on disk)", choices=PLANS)
    store: str = _setting(
        "artifacts/store", "the durable queue: a folder (SQLite, one server: queue, result images, signing keys) or "
        "a postgresql://user@host/db URL that several replicas share (PIXART_STORE; keep the password out of the "
        "command line: PGPASSWORD or a Kubernetes Secret into PIXART_STORE)")
    results: str | None = _setting(
        None, "where result images go: a folder (default <store>/results with SQLite; with PostgreSQL one every "
        "replica mounts, a ReadWriteMany volume) or s3://bucket/prefix (S3-compatible object storage; clients get "
        "presigned URLs; needs the [s3] extra; credentials from the standard AWS chain). Required with PostgreSQL")
    # the AWS SDKs' own variables too, so that path-style addressing follows from them (see server/storage/s3.py)
    s3_endpoint_url: str | None = _setting(
        None, "an S3-compatible server for s3:// results, e.g. http://minio:9000 (PIXART_S3_ENDPOINT_URL, "
        "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL); default AWS S3", env=["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
    s3_region: str | None = _setting(
        None, "the bucket's region for s3:// results (default: AWS_REGION / the AWS config)")
    lease_s: float = _setting(
        30.0, "seconds a replica's claim on a request lasts without renewal (renewed every --poll-interval): how "
        "long the work of a replica that died waits before another takes it", flag="--lease")
    poll_s: float = _setting(
        0.25, "seconds between a replica's claims, lease renewals and checks for cancels sent elsewhere",
        flag="--poll-interval")
    replica_id: str | None = _setting(None, "this replica's name in the store's claims (default host-pid-random)")
    result_ttl_s: float = _setting(86400.0, "seconds a finished request stays retrievable", flag="--result-ttl")
    api_keys: list[str] = _setting(
        [], "accepted API key (repeatable); PIXART_API_KEYS (comma-separated) adds more. No key configured: no "
        "authentication", flag="--api-key", env_name="PIXART_API_KEYS")
    api_keys_file: str | None = _setting(
        None, "file of API keys, one a line: KEY, NAME KEY or NAME sha256:HEX; the name is the tenant that logs, "
        "metrics and fair turns use")
    tls_cert: str | None = _setting(None, "PEM certificate chain; with --tls-key enables TLS")
    tls_key: str | None = _setting(None, "PEM private key")
    grace_s: float = _setting(30.0, "seconds running work may take to finish after SIGTERM", flag="--grace")
    providers: list[str] | None = _setting(None, "comma-separated ONNX Runtime providers", kind=comma_list)
    cuda_graphs: bool = _setting(False, "capture the transformer's steps as CUDA graphs (CUDA or TensorRT provider; "
                                 "rows and text are padded to a few shapes, captured at warm-up)")
    trt_cache_dir: str | None = _setting(
        None, "where TensorRT keeps its engines and timing cache (default <engine>/trt-cache): a writable folder, "
        "which `pixart build-engines --cache-dir` fills ahead of time")
    warmup: bool = _setting(True, "skip the warm-up generation before serving", flag="--no-warmup", negate=True)
    port_file: str | None = _setting(None, "write {port, http_port} as JSON here once serving (useful with port 0)")
    log_level: str = _setting("INFO", "log level")
    log_format: str = _setting("json", "log lines as JSON objects or as text", choices=("json", "text"))
    # Not a flag: Engine.load keywords resolved from the engine settings above and the memory plan (server.cli)
    engine_options: dict[str, Any] = field(default_factory=dict)

    @property
    def tls(self) -> tuple[str, str] | None:
        return (self.tls_cert, self.tls_key) if self.tls_cert and self.tls_key else None


def _settings() -> list:
    return [f for f in fields(ServerConfig) if "help" in f.metadata]


def flag_of(f: Any) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _env_names(f: Any) -> list[str]:
    own = f.metadata.get("env_name") or "PIXART_" + flag_of(f)[2:].upper().replace("-", "_")
    return [own, *f.metadata.get("env", [])]


def _kind(f: Any) -> Any:
    if f.metadata["kind"] is not None:
        return f.metadata["kind"]
    default = f.default if f.default is not MISSING else None
    return type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else str


def _from_env(f: Any) -> Any:
    """The setting's value from the environment, or MISSING."""
    for name in _env_names(f):
        value = os.environ.get(name)
        if value:
            if f.metadata.get("negate"):
                return value.strip().lower() not in ("1", "true", "yes", "on")
            if f.default is False:
                return value.strip().lower() in ("1", "true", "yes", "on")
            if f.default_factory is list:
                return comma_list(value)
            return _kind(f)(value)
    return MISSING


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, its default taken from PIXART_<FLAG> when that is set."""
    for f in _settings():
        meta, env = f.metadata, _from_env(f)
        names = [flag_of(f), *meta.get("aliases", [])]
        kw: dict[str, Any] = {"dest": f.name, "help": f"{meta['help']} ({_env_names(f)[0]})"}
        for key in ("choices", "metavar"):
            if key in meta:
                kw[key] = meta[key]
        if meta.get("negate"):
            parser.add_argument(*names, action="store_false", default=True if env is MISSING else env, **kw)
        elif f.default is False:
            parser.add_argument(*names, action="store_true", default=False if env is MISSING else env, **kw)
        elif f.default_factory is list:
            parser.add_argument(*names, action="append", default=[] if env is MISSING else env, **kw)
        else:
            default = f.default if env is MISSING else env
            required = meta.get("required", False) and default is None
            parser.add_argument(*names, type=_kind(f), default=default, required=required, **kw)


def from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in _settings()})
