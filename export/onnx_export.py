"""Export a diffusers-format PixArt-Σ checkpoint to ONNX: the graphs of export.graphs, the variants made from them
(fused, int8, half precision, quantized T5) and the one manifest that describes the folder.

`export_model` is the one entry point; `add_variants` brings an existing export up to date without re-exporting.
The checkpoint is always given: building the embedded default is the caller's (default_model.checkpoint).
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine import manifest as manifest_format
from engine.manifest import TRANSFORMER_PARTS as PARTS
from engine.manifest import sha256
from engine.vocabulary import MAX_SEQUENCE_LENGTH
from export.graphs.safety_checker import build_default_checker, export_safety_checker
from export.graphs.text_encoder import export_text_encoder
from export.graphs.transformer import export_transformer, export_transformer_parts, pos_embed_geometry
from export.graphs.vae import export_vae_decoder
from export.onnx_io import OPSET
from export.optimize import QUANTIZATIONS, WeightOnly, fuse, fuse_attention_file, quantize_int8, quantize_weights
from export.precision import HALF, T5_HALF, half_copy
from export.preview import fit_preview
from export.tokenizer import tokenizer_json_for

log = logging.getLogger(__name__)

MANIFEST = manifest_format.FILE
# The 2K transformer repository ships no text encoder, tokenizer or VAE: they come from here
# (docs/pixart-sigma.md §1.1).
SIGMA_BASE_COMPONENTS = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
# The int8-weight transformer: fp16 activations (no int8 activation path on the GPU); on the CPU provider its
# weights stay int8 too (measured at `small`: 141 MiB resident against 395 for fp32).
TRANSFORMER_INT8 = WeightOnly(8, 128, accuracy_level=0)
TRANSFORMER_INT8_NOTE = "fp16 activations; MatMul weights int8 in blocks of 128; self-attention fused"
FUSED_NOTE = "; self-attention fused (com.microsoft.MultiHeadAttention)"


def load_components(model: str | Path, base: str | Path | None = None) -> dict:
    """Load a diffusers-format PixArt-Σ checkpoint (folder or hub id) component by component, in fp32.

    The text encoder is not loaded: it is exported block by block from its folder (export.graphs.text_encoder), so that
    T5-XXL never sits in memory whole."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config

    model = str(model)
    base = str(base) if base else (model if _has_subfolder(model, "text_encoder") else SIGMA_BASE_COMPONENTS)
    transformer = PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=torch.float32)
    text_encoder = _subfolder_path(base, "text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32)
    return {
        "transformer": transformer.eval(),
        "text_encoder": text_encoder,
        "text_encoder_config": T5Config.from_pretrained(text_encoder),
        "vae": vae.eval(),
        "scheduler_config": _read_config(model if _has_subfolder(model, "scheduler") else base, "scheduler"),
        "tokenizer_dir": _subfolder_path(base, "tokenizer"),
    }


def aspect_ratio_bins(sample_size: int) -> dict[str, list[int]]:
    """The pipeline's bin table for this transformer ({ratio: [H, W]}), taken from diffusers itself."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    tables = {256: sigma.ASPECT_RATIO_2048_BIN, 128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN,
              32: alpha.ASPECT_RATIO_256_BIN}
    if sample_size not in tables:
        raise ValueError(f"no resolution-bin table for sample_size {sample_size} (diffusers has 32, 64, 128, 256)")
    return {k: [int(v[0]), int(v[1])] for k, v in tables[sample_size].items()}


def export_model(
    model: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    precisions: tuple[str, ...] | list[str] = (),
    optimize: bool = True,
    int8: bool = False,
    quantize_text_encoder: tuple[str, ...] | list[str] = (),
    text_encoder_precision: str = "fp32",
    quantize_transformer: bool = False,
    safety_checker: str | Path | None = None,
    head_blocks: int | None = 1,
    progress: bool = True,
) -> Path:
    """Export the checkpoint `model` (folder or hub id) to `out_dir`; return the manifest's path.

    Besides the plain fp32 graphs: `optimize` adds ONNX Runtime's fused graphs (variant "optimized", the
    engine's default), `int8` adds an int8-weight transformer graph (variant "int8"), and each of `precisions`
    ("fp16", "bf16") a half-precision text encoder and transformer (variants of those names; see
    export.precision for what stays fp32). Each of `quantize_text_encoder` ("int4", "int8") adds a text encoder
    with block-wise weight-only quantized MatMuls (ONNX Runtime's MatMulNBits), under the variant of that name
    (int8 beside the int8 transformer when both are asked for). `quantize_transformer` adds the fp16 transformer
    with int8 weight-only MatMuls (variant "fp16-int8"; needs "fp16" in `precisions`), the GPU's smaller
    transformer. `text_encoder_precision` "fp16" writes the plain
    text encoder graph in fp16 (T5-XXL: 9.5 GB instead of 19; the fp16 variant then shares it).
    `safety_checker`: a StableDiffusionSafetyChecker checkpoint (folder or hub id) to export beside the model,
    or "default" for the embedded tiny one. `head_blocks`: the transformer is also exported as head (the first
    `head_blocks` blocks), body and tail graphs, for first-block-residual caching (engine.transformer_parts; plain,
    fused and int8, not the half-precision variants); None leaves them out.
    """
    check_options(precisions, quantize_text_encoder, quantize_transformer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = ["load", "text_encoder", "transformer", "vae_decoder", "tokenizer", "manifest"]
    steps += ["transformer parts"] * (head_blocks is not None)
    steps += ["optimize"] * optimize + ["int8"] * int8 + list(precisions) + [f"T5 {q}" for q in quantize_text_encoder]
    steps += ["fp16-int8"] * quantize_transformer
    steps += ["safety checker"] * bool(safety_checker)
    bar = tqdm(total=len(steps), desc="export", unit="step", disable=not progress)
    started = time.perf_counter()

    def advance(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    c = load_components(model, base)
    advance("loaded")
    files = {"text_encoder": export_text_encoder(c["text_encoder"], out / "text_encoder.onnx",
                                                 precision=text_encoder_precision)}
    advance("text encoder")
    files["transformer"] = export_transformer(c["transformer"], out / "transformer.onnx")
    advance("transformer")
    if head_blocks is not None:
        files.update(export_transformer_parts(c["transformer"], out, head_blocks))
        advance("transformer parts")
    files["vae_decoder"] = export_vae_decoder(c["vae"], out / "vae_decoder.onnx")
    advance("VAE decoder")
    files["tokenizer"] = tokenizer_json_for(c["tokenizer_dir"], out / "tokenizer.json")
    advance("tokenizer")
    variants, fusions = make_variants(c, files, out, optimize, int8, advance)
    precision_notes = {}
    for name in quantize_text_encoder:
        q, activations = quantized_text_encoder(name)
        variants.setdefault(name, {})["text_encoder"] = export_text_encoder(
            c["text_encoder"], out / f"text_encoder.{name}.onnx", precision=activations, quantization=q)
        precision_notes.setdefault(name, {})["text_encoder"] = (
            f"MatMul weights int{q.bits}, blocks of {q.block_size}, symmetric; " + (
                f"accuracy level {q.accuracy_level} (the CPU kernel's); the rest fp32" if activations == "fp32" else
                "fp16 activations (the CUDA kernel's fast path); feed-forward output projections fp32"))
        advance(f"T5 {name}")
    for name in precisions:
        reuse = files["text_encoder"] if text_encoder_precision == name else None
        variants[name], precision_notes[name] = export_half(c, out, name, text_encoder=reuse)
        advance(name)
    if quantize_transformer:
        variants["fp16-int8"] = {"transformer": quantize_weights(variants["fp16"]["transformer"],
                                                                 out / "transformer.fp16-int8.onnx", TRANSFORMER_INT8)}
        precision_notes["fp16-int8"] = {"transformer": TRANSFORMER_INT8_NOTE}
        advance("fp16-int8")
    checker = None
    if safety_checker:
        if str(safety_checker) == "default":
            safety_checker = build_default_checker(out / "safety_checker_checkpoint")
        checker = export_safety_checker(safety_checker, out)
        files["safety_checker"] = out / checker["file"]
        advance("safety checker")
    manifest = build_manifest(model, c, files, variants, fusions, checker, precision_notes,
                              time.perf_counter() - started)
    manifest["preview"] = fit_preview(c["vae"])  # the live previews' latent -> RGB map (export/preview.py)
    manifest["text_encoder"]["precision"] = text_encoder_precision
    if head_blocks is not None:
        manifest["transformer"]["head_blocks"] = head_blocks
    # Linux reports KiB: the export's own peak, so that "exports in N GB" is a recorded fact, not a claim
    manifest["export_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    advance("manifest")
    bar.close()
    return path


def check_options(precisions: tuple[str, ...] | list[str] = (), quantize_text_encoder: tuple[str, ...] | list[str] = (),
                  quantize_transformer: bool = False) -> None:
    """Raise ValueError for variants export_model cannot make, before anything is written."""
    unknown = [p for p in precisions if p not in HALF]
    if unknown:
        raise ValueError(f"precisions: {unknown} are not among {sorted(HALF)} (fp32 is always exported)")
    if quantize_transformer and "fp16" not in precisions:
        raise ValueError("quantize_transformer: quantizes the fp16 transformer; add \"fp16\" to precisions")
    known = [*QUANTIZATIONS, *(f"{q}-fp16" for q in QUANTIZATIONS)]
    unknown = [q for q in quantize_text_encoder if q not in known]
    if unknown:
        raise ValueError(f"quantize_text_encoder: {unknown} are not among {known}")


def quantized_text_encoder(name: str) -> tuple[WeightOnly, str]:
    """(the weights' quantization, the activations' precision) of a quantized T5 variant: "int8" keeps fp32
    activations (the CPU's MatMulNBits multiplies in int8 at `accuracy_level` 4); "int8-fp16" has fp16 ones, which
    CUDA's MatMulNBits needs for its fast path (with fp32 activations it dequantizes the weights and multiplies)."""
    bits, _, activations = name.partition("-")
    return QUANTIZATIONS[bits], activations or "fp32"


def make_variants(c: dict, files: dict[str, Path], out: Path, optimize: bool, int8: bool, advance) -> tuple[dict, dict]:
    shapes = {
        "transformer": (c["transformer"].config.num_attention_heads, c["transformer"].inner_dim),
        "text_encoder": (c["text_encoder_config"].num_heads, c["text_encoder_config"].d_model),
    }
    shapes.update({part: shapes["transformer"] for part in PARTS if part in files})
    variants: dict[str, dict[str, Path]] = {}
    fusions: dict[str, dict[str, int]] = {}
    if optimize:
        variants["optimized"] = {}
        for name, (heads, hidden) in shapes.items():
            target = out / f"{name}.opt.onnx"
            external = files[name].with_name(files[name].name + ".data").exists()
            if name.startswith("transformer"):
                # our attention fusion first: ONNX Runtime's optimizer does not match the DiT's attention
                source = target if external else out / f"{name}.mha.onnx"
                attention = fuse_attention_file(files[name], source, heads)
                fusions[name] = {"MultiHeadAttention": attention}
                variants["optimized"][name] = target
                if external:
                    continue
                fusions[name] = fuse(source, target, "transformer", heads, hidden)
                source.unlink()
                continue
            if external:
                # Past 2 GB (T5 from `small` up) ONNX Runtime's offline optimizer holds several copies of the graph
                # (17.6 GB for the 2.8 GB T5 of `small`); the session still fuses at load, and trimmed text makes
                # T5 a small share of the time, so the variant keeps the plain graph.
                log.info("%s: weights past 2 GB, no offline fusion (the session fuses at load)", name)
                continue
            fusions[name] = fuse(files[name], target, name, heads, hidden)
            variants["optimized"][name] = target
        advance("fused")
    if int8:
        # From the plain graph: the session applies its own fusions around the quantized MatMuls. The transformer
        # only: it is where the time goes (text is trimmed to a few dozen tokens), and quantize_dynamic holds
        # several copies of a graph's weights, which for T5 (2.8 GB in `small`, 19 GB real) exceeds 24 GiB.
        variants["int8"] = {name: quantize_int8(files[name], out / f"{name}.int8.onnx")
                            for name in ("transformer", *PARTS) if name in files}
        advance("int8")
    return variants, fusions


def export_half(c: dict, out: Path, name: str, text_encoder: Path | None = None
                ) -> tuple[dict[str, Path], dict[str, str]]:
    """Export `name` ("fp16" or "bf16") text encoder and transformer; return their files and what each holds
    (export.precision says what stays fp32 and why).
    `text_encoder`: a graph of this precision already exported (the plain one), used instead of a second copy."""
    files: dict[str, Path] = {}
    notes = {"text_encoder": "fp32", "vae_decoder": "fp32"}
    if name in T5_HALF:
        files["text_encoder"] = text_encoder or export_text_encoder(
            c["text_encoder"], out / f"text_encoder.{name}.onnx", precision=name)
        notes["text_encoder"] = f"{name}; feed-forward output projections and the residual stream fp32"
    files["transformer"] = export_half_transformer(c["transformer"], out / f"transformer.{name}.onnx", name)
    notes["transformer"] = f"{name}; timestep embedding fp32" + (FUSED_NOTE if name == "fp16" else "")
    return files, notes


def export_half_transformer(transformer: torch.nn.Module, path: Path, name: str = "fp16",
                            latent_hw: tuple[int, int] = (16, 24)) -> Path:
    """The transformer in `name` ("fp16" or "bf16") with its fp32 islands; fp16's self-attention fused."""
    dtype = HALF[name]
    # The patch embedding is a Conv, which ONNX (opset 18) does not define for bf16: it stays fp32 in that variant.
    half = half_copy(transformer, dtype, ("pos_embed.proj",) if name == "bf16" else ())
    export_transformer(half, path, latent_hw)
    if name == "fp16":  # the CUDA provider's fp16 path: its fused attention (flash) keeps no token x token scores
        fuse_attention_file(path, path, int(transformer.config.num_attention_heads))
    return path


def add_variants(export_dir: str | Path, *, quantize_transformer: bool = False) -> dict[str, str]:
    """Bring an existing export up to date without re-exporting (T5-XXL takes half an hour): add the
    fused-attention transformer as the "optimized" one where that variant lacks it, fuse the fp16 transformer in
    place, and with `quantize_transformer` add the int8-weight fp16 transformer (variant "fp16-int8"). The
    manifest records what was done; returns {file: what was done to it}. Running it again changes nothing."""
    from engine.manifest import Manifest

    manifest = Manifest.load(export_dir)
    data, folder = dict(manifest.data), manifest.folder
    heads = int(data["transformer"]["config"]["num_attention_heads"])
    done: dict[str, str] = {}
    variants = data.setdefault("variants", {})
    optimized = variants.setdefault("optimized", {})
    if "transformer" not in optimized:
        target = folder / "transformer.opt.onnx"
        fused = fuse_attention_file(folder / data["files"]["transformer"], target, heads)
        optimized["transformer"] = target.name
        data.setdefault("fusions", {})["transformer"] = {"MultiHeadAttention": fused}
        done[target.name] = f"{fused} attentions fused"
    fp16 = variants.get("fp16", {}).get("transformer")
    notes = data.setdefault("precisions", {})
    if fp16 and "fused" not in notes.get("fp16", {}).get("transformer", ""):
        fused = fuse_attention_file(folder / fp16, folder / fp16, heads)
        notes["fp16"]["transformer"] += FUSED_NOTE
        done[fp16] = f"{fused} attentions fused"
    if quantize_transformer and fp16 and "fp16-int8" not in variants:
        target = quantize_weights(folder / fp16, folder / "transformer.fp16-int8.onnx", TRANSFORMER_INT8)
        variants["fp16-int8"] = {"transformer": target.name}
        notes["fp16-int8"] = {"transformer": TRANSFORMER_INT8_NOTE}
        done[target.name] = "int8 weights"
    for name in done:
        data.setdefault("hashes", {})[name] = {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True))
    return done


def build_manifest(
    model, c: dict, files: dict[str, Path], variants: dict, fusions: dict, checker: dict | None,
    precisions: dict[str, dict[str, str]], seconds: float,
) -> dict:
    import diffusers
    import onnx
    import transformers

    tr, vae, te = c["transformer"], c["vae"], c["text_encoder_config"]
    base_size, interpolation_scale = pos_embed_geometry(tr)
    hashed = {}
    every_file = list(files.values()) + [f for v in variants.values() for f in v.values()]
    for f in every_file:
        for p in [f, f.with_name(f.name + ".data")]:
            if p.exists():
                hashed[p.name] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    return {
        "format": manifest_format.FORMAT,
        "source_model": str(model),
        "precision": "fp32",  # the plain graphs; half-precision variants are described under "precisions"
        "precisions": precisions,
        "files": {name: f.name for name, f in files.items()},
        "variants": {v: {name: f.name for name, f in graphs.items()} for v, graphs in variants.items()},
        "fusions": fusions,
        "hashes": hashed,
        "transformer": {
            "config": _jsonable(dict(tr.config)),
            "inner_dim": int(tr.inner_dim),
            "pos_embed": {"base_size": base_size, "interpolation_scale": interpolation_scale},
        },
        "text_encoder": {"config": _jsonable(te.to_dict()), "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "vae": {
            "config": _jsonable(dict(vae.config)),
            "scaling_factor": float(vae.config.scaling_factor),
            "scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        },
        "scheduler": {"config": _jsonable(c["scheduler_config"])},
        "aspect_ratio_bins": aspect_ratio_bins(int(tr.config.sample_size)),
        "safety_checker": checker,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
            "python": platform.python_version(),
        },
        "export_seconds": round(seconds, 2),
    }


def _has_subfolder(model: str, sub: str) -> bool:
    if Path(model).is_dir():
        return (Path(model) / sub).is_dir()
    from huggingface_hub import file_exists

    config = "scheduler_config.json" if sub == "scheduler" else "config.json"
    name = "spiece.model" if sub == "tokenizer" else config
    return file_exists(model, f"{sub}/{name}")


def _subfolder_path(model: str, sub: str) -> Path:
    if Path(model).is_dir():
        return Path(model) / sub
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=[f"{sub}/*"])) / sub


def _read_config(model: str, sub: str) -> dict:
    return json.loads((_subfolder_path(model, sub) / "scheduler_config.json").read_text())


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k.startswith("_") and k not in ("_class_name",):
            continue
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return json.loads(json.dumps(out, default=str))
