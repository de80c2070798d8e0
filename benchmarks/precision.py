"""Half-precision variants measured on the CPU: per-component error against the fp32 graphs and against the torch
modules in the same precision, images' PSNR at two bins, finiteness. Writes benchmarks/results/precision-<config>.json.

    python -m benchmarks.precision --config tiny|small      # the checkpoint's three components, end to end
    python -m benchmarks.precision --config full-transformer  # PixArt-Σ XL/2 at real dimensions, one step

What the CPU can show (see tests/export/test_precision.py): fp16 storage with fp32 arithmetic (ONNX Runtime's CPU
provider inserts casts) and bf16 in onnx's reference evaluator; not the rounding of fp16 accumulation on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common.images import psnr
from benchmarks.common.paths import RESULTS

SIZES = ((256, 256), (448, 256))


def _stats(ours: np.ndarray, ref: np.ndarray) -> dict:
    a, b = ours.reshape(len(ours), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"max_abs_error": float(np.abs(a - b).max()), "reference_max_abs": float(np.abs(b).max()),
            "relative_max_error": float(np.abs(a - b).max() / np.abs(b).max()), "min_cosine": float(cosine.min()),
            "finite": bool(np.isfinite(ours).all())}


def transformer_step(module, export: Path, names: dict[str, str], hw: tuple[int, int], text: int) -> dict:
    """One step of each variant's transformer graph against the fp32 graph and the torch module in that precision."""
    import onnxruntime as ort
    import torch
    from onnx.reference import ReferenceEvaluator

    from engine.positions import sincos_pos_embed
    from export.graphs.transformer import TransformerGraph, pos_embed_geometry
    from export.precision import HALF, half_copy

    cfg = module.config
    rng = np.random.default_rng(0)
    h, w = hw
    mask = np.ones((2, text), np.int64)
    mask[0, text // 3:] = 0
    feeds = {
        "latents": rng.standard_normal((2, cfg.in_channels, h, w), dtype=np.float32),
        "timestep": np.array([999.0, 250.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, text, cfg.caption_channels), dtype=np.float32),
        "encoder_attention_mask": mask,
        "pos_embed": sincos_pos_embed(module.inner_dim, h // cfg.patch_size, w // cfg.patch_size,
                                      *pos_embed_geometry(module)).copy(),
    }
    cpu = ["CPUExecutionProvider"]
    fp32 = ort.InferenceSession(str(export / names["fp32"]), providers=cpu).run(None, feeds)[0]
    out = {}
    for name, file in names.items():
        if name == "fp32":
            continue
        t0 = time.perf_counter()
        if name == "bf16":  # no bf16 kernels on the CPU provider
            ours = ReferenceEvaluator(str(export / file)).run(None, feeds)[0]
        else:
            ours = ort.InferenceSession(str(export / file), providers=cpu).run(None, feeds)[0]
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            graph = TransformerGraph(half_copy(module, HALF[name], ("pos_embed.proj",) if name == "bf16" else ()))
            torch_half = graph(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())).numpy()
        out[name] = {"vs_fp32_graph": _stats(ours, fp32), "vs_torch_same_precision": _stats(ours, torch_half),
                     "seconds": seconds}
    return out


def measure_checkpoint(config: str, root: Path) -> dict:
    """tiny/small: export with fp16 and bf16 variants, then T5, one transformer step and images at two bins."""
    import onnxruntime as ort
    import torch
    from transformers import T5EncoderModel

    from benchmarks.models import cached_export
    from engine import Engine, GenerationRequest
    from export.onnx_export import load_components
    from export.precision import half_copy

    checkpoint, export, info = cached_export(config, 256, export_options={"optimize": False,
                                                                          "precisions": ["fp16", "bf16"]}, root=root)
    manifest = json.loads((export / "manifest.json").read_text())
    report: dict = {"config": config, "export": info, "precisions": manifest["precisions"]}
    # text encoder
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 900, (2, 64), dtype=np.int64)
    mask = np.ones((2, 64), np.int64)
    mask[0, 20:] = 0
    keep = mask.astype(bool)
    feeds = {"input_ids": ids, "attention_mask": mask}
    cpu = ["CPUExecutionProvider"]
    fp32 = ort.InferenceSession(str(export / "text_encoder.onnx"), providers=cpu).run(None, feeds)[0]
    fp16 = ort.InferenceSession(str(export / "text_encoder.fp16.onnx"), providers=cpu).run(None, feeds)[0]
    t5 = T5EncoderModel.from_pretrained(checkpoint, subfolder="text_encoder").eval()
    with torch.no_grad():
        ref16 = half_copy(t5, torch.float16, ("wo",))(input_ids=torch.from_numpy(ids),
                                                     attention_mask=torch.from_numpy(mask)).last_hidden_state
    del t5
    report["text_encoder"] = {"fp16": {"vs_fp32_graph": _stats(fp16[keep], fp32[keep]),
                                       "vs_torch_same_precision": _stats(fp16[keep], ref16.float().numpy()[keep])}}
    c = load_components(checkpoint)
    report["transformer"] = transformer_step(c["transformer"], export, {
        "fp32": "transformer.onnx", "fp16": "transformer.fp16.onnx", "bf16": "transformer.bf16.onnx"}, (32, 24), 32)
    del c
    # images: the fp16 variant against fp32, two bins
    engines = {v: Engine.load(export, variant=v) for v in ("fp32", "fp16")}
    report["images"] = {}
    for size in SIZES:
        request = GenerationRequest(prompt="a red circle on a blue background", seed=1, num_inference_steps=10,
                                    image_size=size, num_images=2)
        images = {v: np.stack([im.pixels for im in e.generate(request).images]) for v, e in engines.items()}
        report["images"][f"{size[0]}x{size[1]}"] = {
            "psnr_fp16_vs_fp32_db": psnr(images["fp16"], images["fp32"]),
            "max_abs_diff": int(np.abs(images["fp16"].astype(int) - images["fp32"].astype(int)).max()),
        }
    return report


def measure_full_transformer(root: Path) -> dict:
    """PixArt-Σ XL/2 (28 x 1152) with random weights, exported fp32/fp16/bf16, one step at 256² latents 32²."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from benchmarks.models import FULL_TRANSFORMER, SIDES
    from export.graphs.transformer import export_transformer
    from export.precision import HALF, half_copy
    from export.seeded import randomize

    cfg = dict(FULL_TRANSFORMER)
    cfg["sample_size"], cfg["interpolation_scale"] = SIDES[256]
    module = PixArtTransformer2DModel(**cfg).eval()
    randomize(module, torch.Generator().manual_seed(0))
    names = {"fp32": "transformer.onnx"}
    export_transformer(module, root / "transformer.onnx")
    for name in ("fp16", "bf16"):
        half = half_copy(module, HALF[name], ("pos_embed.proj",) if name == "bf16" else ())
        export_transformer(half, root / f"transformer.{name}.onnx")
        names[name] = f"transformer.{name}.onnx"
        del half
    sizes = {n: sum(p.stat().st_size for p in root.glob(f"{f}*")) for n, f in names.items()}
    return {"config": "full-transformer", "parameters": sum(p.numel() for p in module.parameters()),
            "file_bytes": sizes, "transformer": transformer_step(module, root, names, (32, 32), 32)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("tiny", "small", "full-transformer"), default="tiny")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pixart-precision-") as tmp:
        if args.config == "full-transformer":
            report = measure_full_transformer(Path(tmp))
        else:
            report = measure_checkpoint(args.config, Path(tmp))
    out = Path(args.out_dir) / f"precision-{args.config}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
