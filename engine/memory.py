"""Fitting the engine into a memory budget: which graphs, where T5 lives, how the VAE decodes.

An edge GPU (a Jetson's 8-16 GB shared with the CPU, an 8 GB card) cannot hold what a data-centre one can: T5-XXL
alone is 19 GB in fp32. Each plan below trades speed for memory in one documented step, and `plan_for_budget`
takes the fastest one whose estimated peak fits:

    default    the export's default graphs, everything resident
    fp16       fp16 transformer and T5, everything resident
    edge       the int8-weight transformer (fp16-int8) where exported, else fp16 (on a CPU: the fused-attention
               fp32 one, since the CPU provider widens fp16); T5 int8 weight-only (fp16 where not exported), on the
               CPU, loaded for an encode that misses the caches and freed after; T5 outputs cached on disk; the VAE
               decodes in 512-pixel tiles; guided requests run their two halves as two transformer calls; the
               transformer's activations are freed after each call (no arena keeping their peak)
    edge-int4  edge with the int4 T5

The estimate is weights (the graph files' sizes) plus each stage's activations at the export's largest bin, with
per-stage figures measured by `pixart bench --memory` (see the README's memory table); its peak is the largest
stage, since T5 is gone before the transformer runs when it is not resident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.manifest import Manifest, ManifestError

PLANS = ("default", "fp16", "edge", "edge-int4")
DEVICES = ("cuda", "cpu")
VAE_TILE = 512
GIB = 2**30
# Activation bytes per stage, measured at real dimensions on ONNX Runtime's CPU provider (benchmarks/memory.py,
# README "Memory"): a transformer call holds about 320 KiB per token and row with its self-attention fused (1.3 GB
# for one 1024² row), plus, unfused, a few (rows, heads, tokens, tokens) fp32 score tensors; the VAE decoder's
# peak grows with the pixels it decodes at once (3.7 GB whole at 1024², 0.8 GB per 512² tile); T5's with the text
# (at most 300 tokens: small).
TRANSFORMER_BYTES_PER_TOKEN_ROW = 320 * 2**10
ATTENTION_COPIES = 3
VAE_BYTES_PER_PIXEL = 3700.0 / (1024 * 1024) * 2**20
RUNTIME_OVERHEAD = 0.4 * GIB  # the interpreter, numpy, ONNX Runtime's libraries and the tokenizer


@dataclass(frozen=True)
class MemoryPlan:
    name: str
    variant: str | None = None
    text_encoder_variant: str | None = None
    text_encoder_device: str = "auto"
    text_encoder_resident: bool = True
    vae_tile: int | None = None
    text_cache_on_disk: bool = False
    guidance_in_one_batch: bool = True
    memory_arena: bool = True  # the transformer's: off, its activations are freed after every call
    stages: dict[str, int] = field(default_factory=dict)  # estimated peak bytes per stage

    @property
    def peak(self) -> int:
        return max(self.stages.values()) if self.stages else 0

    def engine_options(self, text_cache_dir: str | Path | None = None) -> dict:
        options = {"variant": self.variant, "text_encoder_variant": self.text_encoder_variant,
                   "text_encoder_device": self.text_encoder_device,
                   "text_encoder_resident": self.text_encoder_resident, "vae_tile": self.vae_tile,
                   "guidance_in_one_batch": self.guidance_in_one_batch, "memory_arena": self.memory_arena}
        if self.text_cache_on_disk and text_cache_dir is not None:
            options["text_cache_dir"] = text_cache_dir
        return options

    def describe(self) -> str:
        t5 = f"T5 {self.text_encoder_variant or self.variant or 'default'}"
        t5 += " on the CPU" if self.text_encoder_device == "cpu" else ""
        t5 += ", resident" if self.text_encoder_resident else ", loaded per encode"
        parts = [f"plan {self.name}: transformer {self.variant or 'default'}", t5,
                 f"VAE in {self.vae_tile}px tiles" if self.vae_tile else "VAE whole",
                 "T5 outputs cached on disk" if self.text_cache_on_disk else "",
                 "guidance halves in two calls" if not self.guidance_in_one_batch else "",
                 "transformer activations freed after each call" if not self.memory_arena else "",
                 f"estimated peak {self.peak / GIB:.1f} GiB"]
        return "; ".join(p for p in parts if p)


def _variant_with(manifest: Manifest, component: str, *preferred: str) -> str | None:
    variants = manifest.get("variants", {})
    return next((v for v in preferred if component in variants.get(v, {})), None)


def make_plan(manifest: Manifest, name: str, device: str = "cuda") -> MemoryPlan:
    """The plan `name` for this export on `device` ("cuda" or "cpu"), its stages estimated; ManifestError when the
    export lacks its graphs.

    On the CPU provider the transformer stays in its plain graph in every plan: ONNX Runtime has no fp16 MatMul on
    x86 CPUs and widens fp16 weights to fp32 at load, so fp16 saves nothing there and costs both copies while
    loading (measured: a 192 MB fp16 graph held 399 MB once loaded)."""
    if name not in PLANS:
        raise ValueError(f"memory plan: one of {PLANS}, not {name!r}")
    if device not in DEVICES:
        raise ValueError(f"device: one of {DEVICES}, not {device!r}")
    missing = []
    if name != "default" and "fp16" not in manifest.get("variants", {}):
        missing.append("--precision fp16")
    wanted = ("int4",) if name == "edge-int4" else ("int8", "fp16")
    t5 = _variant_with(manifest, "text_encoder", *wanted)
    if name.startswith("edge") and t5 is None:
        missing.append(f"--quantize-text-encoder {wanted[0]}")
    if missing:
        raise ManifestError(f"plan {name} needs graphs this export lacks: export with `pixart export "
                            f"{' '.join(missing)}`")
    # int8 weights where exported (kept int8 on CPU and GPU), else the fused-attention graph (no token x token
    # scores held) of the device's precision
    variants = manifest.get("variants", {})
    cpu_transformer = "optimized" if "transformer" in variants.get("optimized", {}) else "fp32"
    transformer = "fp16-int8" if "fp16-int8" in variants else "fp16" if device == "cuda" else cpu_transformer
    if name == "default":
        plan = MemoryPlan(name)
    elif name == "fp16":
        plan = MemoryPlan(name, variant="fp16")
    else:
        plan = MemoryPlan(name, variant=transformer, text_encoder_variant=t5, text_encoder_device="cpu",
                          text_encoder_resident=False, vae_tile=VAE_TILE, text_cache_on_disk=True,
                          guidance_in_one_batch=False, memory_arena=False)
    return MemoryPlan(**{**plan.__dict__, "stages": estimate(manifest, plan, device)})


def _is_half(manifest: Manifest, component: str, variant: str) -> bool:
    if component == "text_encoder" and variant not in ("int4", "int8"):
        return variant == "fp16" or manifest["text_encoder"].get("precision") == "fp16"
    return component == "transformer" and variant == "fp16"  # fp16-int8: int8 MatMul weights stay int8


def _attention_fused(manifest: Manifest, variant: str) -> bool:
    """Whether this variant's transformer runs its self-attention as MultiHeadAttention (export records it)."""
    if variant == "optimized":
        return bool(manifest.get("fusions", {}).get("transformer", {}).get("MultiHeadAttention"))
    return "fused" in manifest.get("precisions", {}).get(variant, {}).get("transformer", "")


def estimate(manifest: Manifest, plan: MemoryPlan, device: str = "cuda") -> dict[str, int]:
    """Peak bytes per stage ("text_encoding", "denoising", "decoding") of one guided image at the largest bin."""
    overrides = {"text_encoder": plan.text_encoder_variant} if plan.text_encoder_variant else None
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"  # the variant it defaults to
    variant, files = manifest.files(plan.variant, overrides, provider=provider)
    chosen = {"text_encoder": plan.text_encoder_variant or variant, "transformer": variant, "vae_decoder": variant}
    weights = {}
    for c, v in chosen.items():
        on_cpu = device == "cpu" or (c == "text_encoder" and plan.text_encoder_device == "cpu")
        widened = on_cpu and _is_half(manifest, c, v)  # fp16 weights become fp32 on the CPU provider
        weights[c] = manifest.file_bytes(files[c]) * (2 if widened else 1)
    tr = manifest["transformer"]
    scale, patch = int(manifest["vae"]["scale_factor"]), int(tr["config"]["patch_size"])
    heads = int(tr["config"]["num_attention_heads"])
    h, w = max(manifest["aspect_ratio_bins"].values(), key=lambda s: s[0] * s[1])
    tokens = (h // scale // patch) * (w // scale // patch)
    rows = 2 if plan.guidance_in_one_batch else 1
    attention = rows * tokens * TRANSFORMER_BYTES_PER_TOKEN_ROW
    if not _attention_fused(manifest, variant):
        attention += ATTENTION_COPIES * rows * heads * tokens**2 * 4
    pixels = min(h * w, plan.vae_tile**2) if plan.vae_tile else h * w
    resident = RUNTIME_OVERHEAD + weights["transformer"] + weights["vae_decoder"]
    t5 = weights["text_encoder"]
    kept_t5 = t5 if plan.text_encoder_resident else 0
    kept_activations = attention if plan.memory_arena else 0  # an arena keeps the transformer's peak
    return {
        "text_encoding": resident + t5 + kept_activations,
        "denoising": resident + kept_t5 + attention,
        "decoding": resident + kept_t5 + kept_activations + int(VAE_BYTES_PER_PIXEL * pixels),
    }


def plan_for_budget(manifest: Manifest, budget_gib: float, device: str = "cuda") -> MemoryPlan:
    """The first plan of PLANS (fastest first) this export supports whose estimated peak fits `budget_gib`."""
    considered = []
    for name in PLANS:
        try:
            plan = make_plan(manifest, name, device)
        except ManifestError:
            continue
        if plan.peak <= budget_gib * GIB:
            return plan
        considered.append(f"{name} {plan.peak / GIB:.1f} GiB")
    raise ValueError(f"memory_budget: {budget_gib:g} GiB is below every plan this export supports "
                     f"({', '.join(considered) or 'none'}); raise the budget, or export the graphs the edge plans "
                     "use (`pixart export --precision fp16 --quantize-text-encoder int4,int8`)")
