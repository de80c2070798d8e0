"""`pixart`: one command, with subcommands for export, local inference, the service and its client."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from engine import vocabulary as v
from server.config import ServerConfig


def _export(args: argparse.Namespace) -> None:
    from export.onnx_export import check_options, export_model

    precisions = [x.strip() for x in args.precision.split(",") if x.strip() and x.strip() != "fp32"]
    quantized = [q.strip() for q in args.quantize_text_encoder.split(",") if q.strip()]
    check_options(precisions, quantized, args.quantize_transformer)  # before the default's checkpoint is written
    model = args.model
    if model is None:  # the embedded default: its checkpoint is written beside the export, which is made from it
        from default_model.checkpoint import build_default_model

        model = build_default_model(Path(args.out) / "checkpoint")
    manifest = export_model(model, args.out, base=args.base, precisions=precisions,
                            optimize=not args.no_optimize, int8=args.int8,
                            quantize_text_encoder=quantized, text_encoder_precision=args.text_encoder_precision,
                            quantize_transformer=args.quantize_transformer,
                            safety_checker=args.safety_checker, head_blocks=args.head_blocks or None,
                            progress=not args.quiet)
    print(f"exported to {manifest.parent} (manifest: {manifest.name})")


def _build_default(args: argparse.Namespace) -> None:
    from default_model.checkpoint import build_default_model

    print(build_default_model(args.out))


def _infer(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from engine import Engine, GenerationRequest

    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    engine = Engine.load(args.engine, providers, step_cache_mechanism=args.step_cache_mechanism,
                         **({"variant": args.variant} if args.variant else {}))
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        style=args.style,
        image_size=args.image_size,
        num_inference_steps=args.steps,
        scheduler=args.scheduler,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        num_images=args.num_images,
        output_format=args.format,
        step_cache=args.step_cache,
    )
    engine.check(request)
    with tqdm(total=request.num_inference_steps, desc="denoising", unit="step") as bar:
        result = engine.generate(request, on_step=lambda step, total: bar.update(1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(result.images) == 1 else [out.with_stem(f"{out.stem}_{i}") for i in range(len(result.images))]
    for path, image in zip(paths, result.images, strict=True):
        path.write_bytes(image.data)
        print(f"wrote {path} ({image.width}x{image.height}, {image.content_type})")
    timings = {k: round(v, 3) for k, v in result.timings.items()}
    print(json.dumps({"seed": result.seed, "providers": engine.providers, "timings_s": timings,
                      "steps_computed": result.steps_computed, "steps_cached": result.steps_cached}))


def _build_engines(args: argparse.Namespace) -> None:
    """Build (or load from the cache) the TensorRT engines of an export, once, for the shapes `pixart serve` with the
    same --max-batch-images, --cuda-graphs and cache folder will ask for."""
    from engine import Engine, GenerationRequest
    from engine.runtime import CPU, CUDA, TENSORRT, default_providers
    from server.cli import gpu_options

    if TENSORRT not in default_providers():
        raise SystemExit("build-engines needs ONNX Runtime's TensorRT provider and a CUDA driver; this machine has "
                         f"{', '.join(default_providers())}. Run it on the deployment's GPU machine.")
    options = gpu_options(str(args.engine), args.max_batch_images, args.cuda_graphs, args.cache_dir)
    options["acceleration"] = dataclasses.replace(options["acceleration"], device_id=args.device_id)
    engine = Engine.load(args.engine, [TENSORRT, CUDA, CPU], variant=args.variant, **options)
    bins = [v.parse_image_size(b) for b in args.bins.split(",")] if args.bins else [
        (w, h) for h, w in engine.bins.values()]
    for size in bins:  # one request per bin: builds the engines on the first, then captures each bin's graph
        engine.generate(GenerationRequest(prompt="build", image_size=size, num_inference_steps=1, seed=0))
        print(f"ready: {size[0]}x{size[1]}")
    print(f"TensorRT engines and timing cache in {options['acceleration'].cache_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a PixArt-Σ checkpoint (default: the embedded tiny model) to ONNX")
    p.add_argument("--model", default=None, help="diffusers-format checkpoint: a folder or a hub id")
    p.add_argument("--base", default=None, help="where the text encoder, tokenizer and VAE come from (2K model)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--precision", default="fp32",
                   help="comma-separated: fp32 (always), fp16, bf16: half-precision text encoder and transformer "
                   "variants beside the fp32 graphs (the VAE decoder stays fp32)")
    p.add_argument("--no-optimize", action="store_true", help="skip ONNX Runtime's fused graphs")
    p.add_argument("--int8", action="store_true", help="also write an int8-weight transformer graph (variant int8)")
    p.add_argument("--text-encoder-precision", choices=("fp32", "fp16"), default="fp32",
                   help="precision of the plain T5 graph: fp16 writes T5-XXL once in 11.5 GB instead of 19 "
                        "(with --precision fp16 the fp16 variant shares it)")
    p.add_argument("--quantize-transformer", action="store_true",
                   help="also write the fp16 transformer with int8 weight-only MatMuls (variant fp16-int8; needs "
                        "--precision fp16)")
    p.add_argument("--quantize-text-encoder", default="", metavar="int4,int8,int4-fp16,int8-fp16",
                   help="also write T5 with block-wise weight-only quantized MatMuls (variants of those names): "
                        "T5-XXL in 2.9 / 5.2 GB instead of 19; int4/int8 keep fp32 activations (the CPU's fast "
                        "path), int4-fp16/int8-fp16 fp16 ones (CUDA's); quantized block by block, in bounded memory")
    p.add_argument("--safety-checker", nargs="?", const="default", default=None, metavar="MODEL",
                   help="export a StableDiffusionSafetyChecker too (e.g. CompVis/stable-diffusion-safety-checker); "
                   "without MODEL, the embedded tiny random-weight one")
    p.add_argument("--head-blocks", type=int, default=1, metavar="N",
                   help="also write the transformer as head (its first N blocks), body and tail graphs, for the "
                   "step cache's block mechanism (README 'Step caching'); 0 leaves them out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("build-default", help="write the embedded default checkpoint (diffusers format)")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=_build_default)

    p = sub.add_parser("infer", help="generate images in this process from an export folder (no server)")
    p.add_argument("prompt")
    p.add_argument("--engine", required=True, type=Path, help="export folder")
    p.add_argument("--out", default="out.png")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--style", default=v.DEFAULT_STYLE, choices=v.STYLE_NAMES)
    p.add_argument("--image-size", default=v.DEFAULT_IMAGE_SIZE, type=v.parse_image_size,
                   help=f"{', '.join(v.IMAGE_SIZE_PRESETS)}, or WIDTHxHEIGHT")
    p.add_argument("--steps", type=int, default=v.DEFAULT_STEPS)
    p.add_argument("--scheduler", default=v.DEFAULT_SCHEDULER, choices=v.SCHEDULERS)
    p.add_argument("--guidance-scale", type=float, default=v.DEFAULT_GUIDANCE)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--format", default=v.DEFAULT_FORMAT, choices=v.OUTPUT_FORMATS)
    p.add_argument("--step-cache", default=v.DEFAULT_STEP_CACHE, choices=v.STEP_CACHE_MODES,
                   help="skip transformer work on steps predicted to change little (README 'Step caching')")
    p.add_argument("--step-cache-mechanism", default=v.DEFAULT_STEP_CACHE_MECHANISM, choices=v.STEP_CACHE_MECHANISMS,
                   help="forecast: skipped rows skip the whole transformer; blocks: they run its first blocks and "
                   "take the rest from their cache")
    p.add_argument("--variant", default=None, help="graph set of the export: optimized, fp32, int8")
    p.add_argument("--providers", default=os.environ.get("PIXART_PROVIDERS"),
                   help="comma-separated ONNX Runtime providers (PIXART_PROVIDERS); default: the best present")
    p.set_defaults(func=_infer)

    p = sub.add_parser("build-engines", help="prebuild the TensorRT engines of an export (once, after install)")
    p.add_argument("--engine", required=True, type=Path, help="export folder")
    p.add_argument("--bins", default="", help="WIDTHxHEIGHT,... to warm (default: every bin of the export)")
    p.add_argument("--max-batch-images", type=int, default=ServerConfig.max_batch_images,
                   help="images per step the engines must take, as `pixart serve --max-batch-images` (x2 rows)")
    p.add_argument("--variant", default="fp32",
                   help="graph set: fp32, the plain graphs (TensorRT makes its own fp16 and fusions; the optimized "
                   "graphs' com.microsoft attention would split the engine)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also capture CUDA graphs, as `pixart serve --cuda-graphs`")
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--cache-dir", default=None,
                   help="engine and timing cache, as `pixart serve --trt-cache-dir` (default: <export>/trt-cache)")
    p.set_defaults(func=_build_engines)

    from benchmarks.bench import register as register_bench
    from benchmarks.load import register as register_loadtest
    from server.cli import register as register_service

    register_service(sub)
    register_bench(sub)
    register_loadtest(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:  # a clean message for errors the user can act on
        from engine.gpu_libraries import ProviderUnavailable
        from engine.request import InvalidRequest

        if isinstance(e, InvalidRequest):
            sys.exit(f"invalid request: {e}")
        if isinstance(e, ProviderUnavailable):
            sys.exit(f"error: {e}")
        raise


if __name__ == "__main__":
    main()
