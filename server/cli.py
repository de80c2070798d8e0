"""`pixart serve` and `pixart generate`: added to the main CLI through register(subparsers).

`serve`'s flags, and their PIXART_<FLAG> environment variables, are generated from the settings (server/config.py);
a flag on the command line wins. API keys: PIXART_API_KEYS (comma-separated). `generate` reads PIXART_ADDRESS and
PIXART_API_KEY (or FAL_KEY). Only this module and server/config.py read the environment; the libraries take what
they pass.
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

from engine.gpu_libraries import ProviderUnavailable
from engine.vocabulary import (
    IMAGE_SIZE_PRESETS,
    OUTPUT_FORMATS,
    SCHEDULERS,
    STEP_CACHE_MODES,
    STYLE_NAMES,
    parse_image_size,
)

from .client.core import DEFAULT_ADDRESS
from .config import ServerConfig, add_arguments, from_args
from .storage import is_database_url, is_s3_url

log = logging.getLogger("pixart.server")


def check(config: ServerConfig) -> None:
    """Refuse settings that cannot work together, before anything opens (SystemExit with the reason)."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    if is_database_url(config.store) and not config.results:
        raise SystemExit("--results: a PostgreSQL store needs results every replica shares (a folder they all "
                         "mount, or s3://bucket/prefix)")
    if is_s3_url(config.results):
        import importlib.util

        from .storage.s3 import MAX_PRESIGN_S

        if importlib.util.find_spec("boto3") is None:
            raise SystemExit("--results s3://...: boto3 is not installed (pip install 'pixart-sigma-serve[s3]')")
        if config.result_url_ttl_s > MAX_PRESIGN_S:
            raise SystemExit(f"--result-url-ttl: presigned S3 URLs last at most {MAX_PRESIGN_S} s (7 days)")
    if config.lease_s <= 3 * config.poll_s:
        raise SystemExit("--lease must be more than 3 x --poll-interval (a claim is renewed every poll)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The settings `serve` was given, checked, with the engine's options resolved (memory plan included)."""
    config = from_args(args)
    check(config)
    explicit = {"variant": config.variant, "intra_op_threads": config.intra_op_threads,
                "text_cache_dir": config.text_cache_dir, "flagged_images": config.flagged_images,
                "text_cache_mb": config.text_cache_mb, "step_cache": config.step_cache,
                "step_cache_mechanism": config.step_cache_mechanism}
    config.engine_options = {**memory_options(config), **{k: v for k, v in explicit.items() if v is not None},
                             **gpu_options(config.engine, config.max_batch_images, config.cuda_graphs,
                                           config.trt_cache_dir)}
    return config


def gpu_options(export: str, max_batch_images: int, cuda_graphs: bool, trt_cache_dir: str | None
                ) -> dict[str, Any]:
    """The engine options that decide which TensorRT engines and CUDA graphs are built: the same for `pixart serve`
    and `pixart build-engines`, so that what the second builds is what the first asks for."""
    from engine.runtime import Acceleration, step_rows

    cache = Path(trt_cache_dir) if trt_cache_dir else Path(export) / "trt-cache"
    return {"max_rows": step_rows(max_batch_images),
            "acceleration": Acceleration(cuda_graphs=cuda_graphs, cache_dir=cache)}


def memory_options(config: ServerConfig) -> dict[str, Any]:
    """Engine options of the memory plan asked for (by name or budget), logged; {} when none was asked for."""
    from engine.manifest import Manifest, ManifestError
    from engine.memory import make_plan, plan_for_budget
    from engine.runtime import provider_device

    if config.memory_plan is None and config.memory_budget is None:
        return {}
    if config.memory_plan is not None and config.memory_budget is not None:
        raise SystemExit("--memory-plan and --memory-budget: give one (a budget picks a plan)")
    if config.variant is not None:
        raise SystemExit("--variant with a memory plan: the plan picks the graphs; drop one of them")
    device = provider_device(config.providers)
    try:
        manifest = Manifest.load(config.engine)
        plan = make_plan(manifest, config.memory_plan, device) if config.memory_plan \
            else plan_for_budget(manifest, config.memory_budget, device)
    except (ManifestError, ValueError) as exc:
        raise SystemExit(f"memory plan: {exc}") from None
    log.info("memory: %s", plan.describe())
    return plan.engine_options(Path(_local_folder(config)) / "text-cache")


def _local_folder(config: ServerConfig) -> str:
    """A folder for this server's own files: the store folder, or with PostgreSQL the results folder (the working
    folder when results are in object storage)."""
    if not is_database_url(config.store):
        return config.store
    return "." if is_s3_url(config.results) or not config.results else config.results


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    from .app import App

    app = App(config)
    await app.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(app.drain()))
    try:
        await app.load_engine()
    except ProviderUnavailable:  # said in one line by cmd_serve: the cause is known
        await app.stop()
        raise
    except Exception:
        log.exception("engine failed to load")
        await app.stop()
        raise
    await app.wait_stopped()


def cmd_serve(args: argparse.Namespace) -> int:
    from .observability.logs import setup_logging
    from .storage import SchemaTooNew, StoreUnavailable
    from .storage.s3 import ResultsUnavailable

    setup_logging(args.log_level, args.log_format == "json")

    try:
        asyncio.run(serve(config_from_args(args)))
    except (SchemaTooNew, StoreUnavailable, ResultsUnavailable, ProviderUnavailable) as exc:  # refuse clearly
        raise SystemExit(f"error: {exc}") from None
    return 0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--address", default=os.environ.get("PIXART_ADDRESS") or DEFAULT_ADDRESS,
                   help="server host:port (PIXART_ADDRESS)")
    p.add_argument("--key", default=os.environ.get("PIXART_API_KEY") or os.environ.get("FAL_KEY"),
                   help="API key (PIXART_API_KEY, or FAL_KEY)")
    p.add_argument("--tls", action="store_true", default=_truthy(os.environ.get("PIXART_TLS")),
                   help="connect with TLS (PIXART_TLS)")
    p.add_argument("--ca", default=os.environ.get("PIXART_CA") or None,
                   help="PEM root certificates for TLS (PIXART_CA)")
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
    p.add_argument("--step-cache", choices=STEP_CACHE_MODES, help="default: the server's (pixart serve --step-cache)")
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
            "step_cache",
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
    add_arguments(p)
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
