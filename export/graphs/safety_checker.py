"""The Stable Diffusion safety checker (a CLIP vision tower plus concept embeddings) as one ONNX graph.

`export_safety_checker` turns a `StableDiffusionSafetyChecker` checkpoint (the layout of
`CompVis/stable-diffusion-safety-checker`: config.json, weights and preprocessor_config.json in one folder, or a
pipeline folder with `safety_checker/` and `feature_extractor/`) into `safety_checker.onnx` plus the manifest entry
the engine needs to preprocess images without torch.

`build_default_checker` writes the tiny random-weight checker that goes with the embedded default model. Its
concept embeddings and thresholds are not random: they are placed relative to the embeddings of a few seeded
calibration images (`calibration_images`), so that the tests can show an image flagged outright, an image flagged
only through the special-care adjustment, and clean images, each with a wide margin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_io import export_graph
from export.seeded import randomize

DEFAULT_SEED = 20240521
FILE = "safety_checker.onnx"
N_CONCEPTS, N_SPECIAL = 17, 3
# diffusers adds this to every concept score of an image that triggered a special-care concept.
SPECIAL_CARE_ADJUSTMENT = 0.01
# Small enough to be fast on CPU, same architecture as the real checker. 224/32 gives 49 patches.
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=32,
)
# The text tower is never run by the checker, but CLIPConfig wants one; its special tokens must fit its vocabulary.
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=128,
    bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
PROJECTION_DIM = 16
# The standard CLIP ViT-L/14 preprocessing, as in the real checker's preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Which calibration image plays which part in the default checker (see `_place_concepts`).
FLAGGED, SPECIAL_CARE = 0, 1


class SafetyCheckerGraph(nn.Module):
    """clip_input (B,3,S,S) -> concept scores (B,17), special-care scores (B,3), has_nsfw_concepts (B,) bool.

    The same arithmetic as diffusers' `StableDiffusionSafetyChecker.forward_onnx`, without the image-blanking side
    effect (the engine decides what happens to a flagged image). The torch `forward` rounds scores to 3 decimals
    before comparing with 0; this graph does not, so the two can only disagree for a score within 0.0005 of zero.
    """

    def __init__(self, checker: nn.Module):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.checker
        pooled = c.vision_model(clip_input)[1]
        embeds = nn.functional.normalize(c.visual_projection(pooled), dim=1)
        special = embeds @ nn.functional.normalize(c.special_care_embeds, dim=1).t() - c.special_care_embeds_weights
        care = (special > 0).any(dim=1, keepdim=True).to(special.dtype)
        concepts = embeds @ nn.functional.normalize(c.concept_embeds, dim=1).t() - c.concept_embeds_weights
        concepts = concepts + SPECIAL_CARE_ADJUSTMENT * care
        return concepts, special, (concepts > 0).any(dim=1)


def calibration_images(seed: int = DEFAULT_SEED) -> list[np.ndarray]:
    """Six seeded uint8 RGB images (H,W,3) of different sizes and kinds: the ones the default thresholds are set on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:384] / np.array([256.0, 384.0])[:, None, None]
    gradient = np.stack([x, y, 1 - x], axis=-1)
    checker = ((np.indices((200, 300)) // 25).sum(axis=0) % 2)[..., None] * np.array([230, 40, 90])
    return [
        rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),  # FLAGGED: white noise
        (gradient * 255).astype(np.uint8),  # SPECIAL_CARE: smooth gradient
        np.full((300, 200, 3), (30, 160, 70), dtype=np.uint8),  # solid colour, portrait
        checker.astype(np.uint8),  # checkerboard
        (rng.random((64, 64, 3)) ** 3 * 255).astype(np.uint8),  # dark noise, smaller than the crop
        np.repeat(rng.integers(0, 256, (1, 512, 3), dtype=np.uint8), 128, axis=0),  # vertical stripes, wide
    ]


def build_default_checker(out_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny checker (CompVis layout: config.json, model.safetensors, preprocessor_config.json); return it."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=PROJECTION_DIM)
    g = torch.Generator().manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    randomize(checker, g)
    # The PIL-backed class explicitly: it is what `CLIPImageProcessor` resolves to without torchvision, and it
    # saves itself as "CLIPImageProcessor", so the folder looks like the real one.
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_VISION["image_size"]},
        crop_size={"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]},
        resample=3, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    clip_input = processor(calibration_images(seed), return_tensors="pt")["pixel_values"]
    _place_concepts(checker, clip_input, g)
    checker.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "README.md").write_text(
        f"Tiny StableDiffusionSafetyChecker-architecture checker with random weights (seed {seed}); its concepts are "
        "placed on seeded calibration images so that both outcomes can be tested. It knows nothing about content.\n"
    )
    return out


def _place_concepts(checker: nn.Module, clip_input: torch.Tensor, g: torch.Generator) -> None:
    """Set concept embeddings and thresholds from the calibration images' embeddings (deterministic, wide margins).

    * concept 0 is image FLAGGED's own embedding, its threshold half-way between 1 and the next-closest image: that
      image is flagged outright, the others are not, even with the special-care adjustment.
    * special-care concept 0 is image SPECIAL_CARE's embedding, thresholded the same way; concept 1 is that embedding
      too, but with threshold 1 + adjustment/2: its score is -0.005 without the adjustment and +0.005 with it, so
      that image is flagged only because the special-care adjustment fired.
    * the remaining concepts are random directions with thresholds well above every calibration score.
    """
    with torch.no_grad():
        pooled = checker.vision_model(clip_input)[1]
        emb = nn.functional.normalize(checker.visual_projection(pooled), dim=1)
        cos = emb @ emb.t()
        gaps = {}
        for i in (FLAGGED, SPECIAL_CARE):
            others = torch.cat([cos[i, :i], cos[i, i + 1 :]])
            gaps[i] = float(1 - others.max())
            if gaps[i] < 4 * SPECIAL_CARE_ADJUSTMENT:
                raise RuntimeError(f"calibration image {i} is too close to another one (gap {gaps[i]:.4f})")
        concepts = torch.randn(N_CONCEPTS, emb.shape[1], generator=g)
        special = torch.randn(N_SPECIAL, emb.shape[1], generator=g)
        concepts[0], concepts[1], special[0] = emb[FLAGGED], emb[SPECIAL_CARE], emb[SPECIAL_CARE]
        margin = 0.1

        def above_all(directions: torch.Tensor) -> torch.Tensor:
            return (emb @ nn.functional.normalize(directions, dim=1).t()).max(dim=0).values + margin

        concept_w, special_w = above_all(concepts), above_all(special)
        concept_w[0] = 1 - gaps[FLAGGED] / 2
        concept_w[1] = 1 + SPECIAL_CARE_ADJUSTMENT / 2
        special_w[0] = 1 - gaps[SPECIAL_CARE] / 2
        checker.concept_embeds.copy_(concepts)
        checker.special_care_embeds.copy_(special)
        checker.concept_embeds_weights.copy_(concept_w)
        checker.special_care_embeds_weights.copy_(special_w)


def _checker_folders(model: str | Path) -> tuple[str, str]:
    """(checker folder, processor folder): the CompVis layout keeps both at the root, pipelines in subfolders."""
    root = Path(model)
    if root.is_dir():
        if (root / "safety_checker" / "config.json").exists():
            return str(root / "safety_checker"), str(root / "feature_extractor")
        return str(root), str(root)
    return str(model), str(model)  # a hub id in the CompVis layout: from_pretrained fetches it


def load_checker(model: str | Path) -> tuple[nn.Module, object]:
    """The checker in eval mode and its image processor (PIL backend: the one that reads uint8 exactly like ours)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    checker_dir, processor_dir = _checker_folders(model)
    checker = StableDiffusionSafetyChecker.from_pretrained(checker_dir).eval()
    processor = CLIPImageProcessorPil.from_pretrained(processor_dir)
    return checker, processor


def preprocess_entry(processor) -> dict:
    """What the engine needs to reproduce `processor` on uint8 images, as plain JSON."""

    def size(s) -> dict:
        return {k: int(v) for k, v in dict(s).items() if v is not None}

    crop = size(processor.crop_size)
    resample = int(processor.resample)
    return {
        "processor": "CLIPImageProcessor (PIL backend)",
        "do_convert_rgb": bool(processor.do_convert_rgb),
        "do_resize": bool(processor.do_resize),
        "size": size(processor.size),
        "resample": resample,
        "resample_name": RESAMPLE_NAMES.get(resample, str(resample)),
        "do_center_crop": bool(processor.do_center_crop),
        "crop_size": crop,
        "do_rescale": bool(processor.do_rescale),
        "rescale_factor": float(processor.rescale_factor),
        "do_normalize": bool(processor.do_normalize),
        "mean": [float(v) for v in processor.image_mean],
        "std": [float(v) for v in processor.image_std],
    }


def export_safety_checker(model: str | Path, out_dir: Path) -> dict:
    """Export the checker at `model` (folder or hub id) to `out_dir/safety_checker.onnx`; return its manifest entry."""
    checker, processor = load_checker(model)
    image_size = int(checker.config.vision_config.image_size)
    graph = SafetyCheckerGraph(checker).eval()
    batch = {0: "batch"}
    export_graph(
        graph, (torch.zeros(2, 3, image_size, image_size),), Path(out_dir) / FILE,
        inputs=["clip_input"], outputs=["scores", "special_scores", "has_nsfw_concepts"],
        dynamic={"clip_input": batch, "scores": batch, "special_scores": batch, "has_nsfw_concepts": batch},
    )
    pre = preprocess_entry(processor)
    pre["image_size"] = image_size
    entry = {
        "file": FILE,
        "source": str(model),
        "inputs": {"clip_input": ["batch", 3, image_size, image_size]},
        "outputs": ["scores", "special_scores", "has_nsfw_concepts"],
        "concepts": N_CONCEPTS,
        "special_care_concepts": N_SPECIAL,
        "special_care_adjustment": SPECIAL_CARE_ADJUSTMENT,
        "preprocess": pre,
    }
    json.dumps(entry)  # fail here, not in the manifest writer, if anything is not JSON
    return entry
