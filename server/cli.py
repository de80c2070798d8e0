"""`pixart serve` and `pixart generate`: added to the main CLI through register(subparsers).

Every flag of `serve` can also be set from the environment as PIXART_<FLAG> (dashes as underscores, e.g.
--max-queue -> PIXART_MAX_QUEUE); a flag on the command line wins. API keys: PIXART_API_KEYS (comma-separated).
`generate` reads PIXART_ADDRESS and PIXART_API_KEY (or FAL_KEY). This module is the only place that reads the
environment; the libraries take what it passes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from engine.memory import PLANS
from engine.vocabulary import (
    FLAGGED_IMAGE_MODES,
    IMAGE_SIZE_PRESETS,
    OUTPUT_FORMATS,
    SCHEDULERS,
    STYLE_NAMES,
    parse_image_size,
)

log = logging.getLogger("pixart.server")
DEFAULT_ADDRESS = "127.0.0.1:50051"


def _env(flag: str, default: Any = None, kind: Any = str) -> Any:
    value = os.environ.get("PIXART_" + flag.upper().replace("-", "_"))
    if value is None or value == "":
        return default
    if kind is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    return kind(value)


def _optional_port(text: str) -> int | None:
    # "off" (or a negative number) disables the HTTP side server
    if str(text).lower() in ("off", "none", "") or int(text) < 0:
        return None
    return int(text)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        default=_env("engine"),
        required=_env("engine") is None,
        help="export folder of the model to serve (PIXART_ENGINE)",
    )
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind gRPC and HTTP to")
    p.add_argument("--port", type=int, default=_env("port", 50051, int), help="gRPC port; 0 picks a free one")
    p.add_argument(
        "--http-port",
        "--metrics-port",
        dest="http_port",
        type=_optional_port,
        default=_env("http_port", _env("metrics_port", 9464, _optional_port), _optional_port),
        help="HTTP port for stored results (signed URLs), /metrics and /healthz; 0 picks a free one, 'off' "
        "disables. TLS with --tls-cert/--tls-key as gRPC",
    )
    p.add_argument(
        "--public-url",
        default=_env("public_url"),
        help="base URL under which callers reach the HTTP port (result URLs); default http(s)://host:port",
    )
    p.add_argument(
        "--metrics-address",
        default=_env("metrics_address"),
        help="HOST:PORT: serve /metrics there, on its own listener without a key (bind it to an internal "
        "address), instead of on the HTTP port, where it needs an API key when keys are configured",
    )
    p.add_argument(
        "--app-id",
        action="append",
        default=[a for a in (_env("app_id") or "").split(",") if a],
        metavar="OWNER/NAME",
        help="fal app id served on the HTTP port besides fal-ai/pixart-sigma (repeatable)",
    )
    p.add_argument(
        "--result-url-ttl",
        type=float,
        default=_env("result_url_ttl", 3600.0, float),
        help="seconds a signed result URL stays valid (a Result call signs fresh ones)",
    )
    p.add_argument(
        "--webhook-allow",
        action="append",
        default=[a for a in (_env("webhook_allow") or "").split(",") if a],
        metavar="CIDR|HOST",
        help="open webhooks to a network or host that the default policy refuses (loopback, private, "
        "link-local...); repeatable; PIXART_WEBHOOK_ALLOW takes a comma-separated list",
    )
    p.add_argument(
        "--webhook-secret",
        default=_env("webhook_secret"),
        help="key that signs webhook deliveries (X-Pixart-Signature); default: a random key kept in the store "
        "folder as webhook-signing.key",
    )
    p.add_argument(
        "--webhook-timeout", type=float, default=_env("webhook_timeout", 10.0, float),
        help="seconds one webhook delivery attempt may take",
    )
    p.add_argument(
        "--webhook-attempts", type=int, default=_env("webhook_attempts", 5, int),
        help="delivery attempts per webhook (exponential backoff from 1 s between them)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=_env("max_queue", 64, int),
        help="requests that may wait; past it RESOURCE_EXHAUSTED",
    )
    p.add_argument("--max-batch", type=int, default=_env("max_batch", 4, int),
                   help="requests stepped together (per size bin)")
    p.add_argument(
        "--max-batch-images",
        type=int,
        default=_env("max_batch_images", 4, int),
        help="images stepped together per size bin (num_images summed)",
    )
    p.add_argument(
        "--max-running-images",
        type=int,
        default=_env("max_running_images", None, int),
        help="memory budget: images in flight across all size bins (default --max-batch-images)",
    )
    p.add_argument(
        "--batching",
        choices=("continuous", "request"),
        default=_env("batching", "continuous"),
        help="continuous: requests join and leave running batches at step boundaries; request: a batch forms "
        "while idle and runs to its end",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=_env("max_wait_ms", 10.0, float),
        help="request-level batching: how long the oldest waiting request may wait for batch companions",
    )
    p.add_argument("--variant", default=_env("variant"),
                   help="graph set of the export: optimized (default when present), fp32, int8")
    p.add_argument("--intra-op-threads", type=int, default=_env("intra_op_threads", 0, int),
                   help="ONNX Runtime threads per session (0: one per core)")
    p.add_argument("--flagged-images", choices=FLAGGED_IMAGE_MODES, default=_env("flagged_images", "black"),
                   help="what the safety checker does to a flagged image")
    p.add_argument("--text-cache-mb", type=float, default=_env("text_cache_mb", 256.0, float),
                   help="memory for cached prompt embeddings")
    p.add_argument("--text-cache-dir", default=_env("text_cache_dir"),
                   help="also keep prompt embeddings on disk here, across restarts (the edge plans: "
                        "<store>/text-cache)")
    p.add_argument("--memory-budget", type=float, default=_env("memory_budget", None, float), metavar="GIB",
                   help="pick the fastest memory plan whose estimated peak fits this many GiB (default, fp16, edge, "
                        "edge-int4; see README 'Memory'); the choice is logged")
    p.add_argument("--memory-plan", choices=PLANS, default=_env("memory_plan"),
                   help="use this memory plan (edge: fp16 transformer, int8 T5 on the CPU loaded per encode, "
                        "tiled VAE, embeddings cached on disk)")
    p.add_argument(
        "--store", default=_env("store", "artifacts/store"),
        help="the durable queue: a folder (SQLite, one server: queue, result images, signing keys) or a "
        "postgresql://user@host/db URL that several replicas share (PIXART_STORE; keep the password out of the "
        "command line: PGPASSWORD or a Kubernetes Secret into PIXART_STORE)",
    )
    p.add_argument(
        "--results", default=_env("results"),
        help="where result images go: a folder (default <store>/results with SQLite; with PostgreSQL one every "
        "replica mounts, a ReadWriteMany volume) or s3://bucket/prefix (S3-compatible object storage; clients get "
        "presigned URLs; needs the [s3] extra; credentials from the standard AWS chain). Required with PostgreSQL",
    )
    p.add_argument(
        "--s3-endpoint-url",
        # the AWS SDKs' own variables too, read here so that path-style addressing follows from them (see S3Results)
        default=_env("s3_endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        help="an S3-compatible server for s3:// results, e.g. http://minio:9000 (PIXART_S3_ENDPOINT_URL, "
        "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL); default AWS S3",
    )
    p.add_argument("--s3-region", default=_env("s3_region"),
                   help="the bucket's region for s3:// results (default: AWS_REGION / the AWS config)")
    p.add_argument("--lease", type=float, default=_env("lease", 30.0, float),
                   help="seconds a replica's claim on a request lasts without renewal (renewed every --poll-interval):"
                        " how long the work of a replica that died waits before another takes it")
    p.add_argument("--poll-interval", type=float, default=_env("poll_interval", 0.25, float),
                   help="seconds between a replica's claims, lease renewals and checks for cancels sent elsewhere")
    p.add_argument("--replica-id", default=_env("replica_id"),
                   help="this replica's name in the store's claims (default host-pid-random)")
    p.add_argument(
        "--result-ttl",
        type=float,
        default=_env("result_ttl", 86400.0, float),
        help="seconds a finished request stays retrievable",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted API key (repeatable); PIXART_API_KEYS "
        "(comma-separated) adds more. No key configured: no authentication",
    )
    p.add_argument("--api-keys-file", default=_env("api_keys_file"), help="file of API keys, one a line")
    p.add_argument("--tls-cert", default=_env("tls_cert"), help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", default=_env("tls_key"), help="PEM private key")
    p.add_argument(
        "--grace",
        type=float,
        default=_env("grace", 30.0, float),
        help="seconds running work may take to finish after SIGTERM",
    )
    p.add_argument("--providers", default=_env("providers"), help="comma-separated ONNX Runtime providers")
    p.add_argument("--no-warmup", action="store_true", default=_env("no_warmup", False, bool))
    p.add_argument(
        "--port-file",
        default=_env("port_file"),
        help="write {port, http_port} as JSON here once serving (useful with port 0)",
    )
    p.add_argument("--log-level", default=_env("log_level", "INFO"))
    p.add_argument("--log-format", choices=("json", "text"), default=_env("log_format", "json"))


def config_from_args(args: argparse.Namespace) -> Any:
    from .app import ServerConfig
    from .auth import load_keys

    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    from .store import is_database_url

    if is_database_url(args.store) and not args.results:
        raise SystemExit("--results: a PostgreSQL store needs results every replica shares (a folder they all "
                         "mount, or s3://bucket/prefix)")
    from .s3results import MAX_PRESIGN_S, is_s3_url

    if is_s3_url(args.results):
        import importlib.util

        if importlib.util.find_spec("boto3") is None:
            raise SystemExit("--results s3://...: boto3 is not installed (pip install 'pixart-sigma-serve[s3]')")
        if args.result_url_ttl > MAX_PRESIGN_S:
            raise SystemExit(f"--result-url-ttl: presigned S3 URLs last at most {MAX_PRESIGN_S} s (7 days)")
    if args.lease <= 3 * args.poll_interval:
        raise SystemExit("--lease must be more than 3 x --poll-interval (a claim is renewed every poll)")
    return ServerConfig(
        engine=args.engine,
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        public_url=args.public_url,
        metrics_address=args.metrics_address,
        result_url_ttl_s=args.result_url_ttl,
        app_ids=list(args.app_id),
        webhook_allow=list(args.webhook_allow),
        webhook_secret=args.webhook_secret,
        webhook_timeout_s=args.webhook_timeout,
        webhook_attempts=args.webhook_attempts,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_batch_images=args.max_batch_images,
        max_running_images=args.max_running_images,
        batching=args.batching,
        max_wait_ms=args.max_wait_ms,
        engine_options={**memory_options(args), **{k: v for k, v in {
            "variant": args.variant, "intra_op_threads": args.intra_op_threads, "text_cache_dir": args.text_cache_dir,
            "flagged_images": args.flagged_images, "text_cache_mb": args.text_cache_mb}.items() if v is not None}},
        store=args.store,
        results=args.results,
        s3_endpoint_url=args.s3_endpoint_url,
        s3_region=args.s3_region,
        lease_s=args.lease,
        poll_s=args.poll_interval,
        replica_id=args.replica_id,
        result_ttl_s=args.result_ttl,
        api_keys=load_keys(args.api_key, args.api_keys_file, os.environ.get("PIXART_API_KEYS", "")),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        grace_s=args.grace,
        providers=[p.strip() for p in args.providers.split(",")] if args.providers else None,
        warmup=not args.no_warmup,
        port_file=args.port_file,
    )


def memory_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine options of the memory plan asked for (by name or budget), logged; {} when none was asked for."""
    from engine.manifest import Manifest, ManifestError
    from engine.memory import make_plan, plan_for_budget
    from engine.runtime import provider_device

    if args.memory_plan is None and args.memory_budget is None:
        return {}
    if args.memory_plan is not None and args.memory_budget is not None:
        raise SystemExit("--memory-plan and --memory-budget: give one (a budget picks a plan)")
    if args.variant is not None:
        raise SystemExit("--variant with a memory plan: the plan picks the graphs; drop one of them")
    device = provider_device([p.strip() for p in args.providers.split(",")] if args.providers else None)
    try:
        manifest = Manifest.load(args.engine)
        plan = make_plan(manifest, args.memory_plan, device) if args.memory_plan \
            else plan_for_budget(manifest, args.memory_budget, device)
    except (ManifestError, ValueError) as exc:
        raise SystemExit(f"memory plan: {exc}") from None
    log.info("memory: %s", plan.describe())
    return plan.engine_options(Path(_local_folder(args)) / "text-cache")


def _local_folder(args: argparse.Namespace) -> str:
    """A folder for this server's own files: the store folder, or with PostgreSQL the results folder (the working
    folder when results are in object storage)."""
    from .s3results import is_s3_url
    from .store import is_database_url

    if not is_database_url(args.store):
        return args.store
    return "." if is_s3_url(args.results) or not args.results else args.results


async def serve(config: Any) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    from .app import App

    app = App(config)
    await app.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(app.drain()))
    try:
        await app.load_engine()
    except Exception:
        log.exception("engine failed to load")
        await app.stop()
        raise
    await app.wait_stopped()


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging

    setup_logging(args.log_level, args.log_format == "json")
    from .s3results import ResultsUnavailable
    from .store import SchemaTooNew

    try:
        asyncio.run(serve(config_from_args(args)))
    except (SchemaTooNew, ResultsUnavailable) as exc:  # refuse clearly at startup, change nothing
        raise SystemExit(f"error: {exc}") from None
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--address", default=os.environ.get("PIXART_ADDRESS") or DEFAULT_ADDRESS,
                   help="server host:port (PIXART_ADDRESS)")
    p.add_argument("--key", default=os.environ.get("PIXART_API_KEY") or os.environ.get("FAL_KEY"),
                   help="API key (PIXART_API_KEY, or FAL_KEY)")
    p.add_argument("--tls", action="store_true", default=_env("tls", False, bool), help="connect with TLS")
    p.add_argument("--ca", default=_env("ca"), help="PEM root certificates for TLS")
    p.add_argument("--negative-prompt")
    p.add_argument("--style", choices=STYLE_NAMES)
    p.add_argument("--image-size", type=parse_image_size, help=f"{', '.join(IMAGE_SIZE_PRESETS)}, or WIDTHxHEIGHT")
    p.add_argument("--steps", type=int, dest="num_inference_steps")
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--safety-checker", action="store_true", default=None, dest="enable_safety_checker")
    p.add_argument("--format", choices=OUTPUT_FORMATS, dest="output_format")
    p.add_argument("--out", default="out.png", help="output file; with several images, -1, -2... are inserted")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .client import Client, PixArtError

    fields = {
        name: getattr(args, name)
        for name in (
            "negative_prompt",
            "style",
            "num_inference_steps",
            "scheduler",
            "guidance_scale",
            "seed",
            "num_images",
            "enable_safety_checker",
            "output_format",
        )
    }
    fields["image_size"] = args.image_size
    bar = None
    try:
        with Client(args.address, args.key, tls=args.tls or None, root_certificates=args.ca) as client:
            result = None
            for event in client.stream(args.prompt, timeout=args.timeout, **fields):
                kind = event.WhichOneof("event")
                if kind == "queued" and not args.quiet:
                    print(f"queued at position {event.queued.position}", file=sys.stderr)
                elif kind == "progress" and not args.quiet:
                    if bar is None:
                        bar = tqdm(total=event.progress.total_steps, desc="denoising", unit="step", file=sys.stderr)
                    bar.update(event.progress.step - bar.n)
                elif kind == "error":
                    raise PixArtError.from_status(event.error)
                elif kind == "result":
                    result = event.result
    except PixArtError as err:
        if bar is not None:
            bar.close()
        print(f"error: {err}", file=sys.stderr)
        for field_name, rule in err.violations:
            print(f"  {field_name}: {rule}", file=sys.stderr)
        raise SystemExit(1) from None  # the main CLI ignores return values
    if bar is not None:
        bar.close()
    if result is None:
        raise SystemExit("error: the stream ended without a result")
    out = Path(args.out)
    for i, img in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(img.file_data)
        print(f"{path} ({img.width}x{img.height}, seed {result.seed}, {result.timings.total:.2f}s)")
    return 0


def register(subparsers: Any) -> None:
    """Add `serve` and `generate` to the main CLI's subparsers (each sets `func`)."""
    p = subparsers.add_parser("serve", help="serve an exported model over gRPC")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    p = subparsers.add_parser("generate", help="generate an image through a running server (live progress)")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixart")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
