"""The safety checker: the exported graph against diffusers' StableDiffusionSafetyChecker, the torch-free CLIP
preprocessing against transformers' CLIPImageProcessor (PIL backend), flagged-image handling, the missing-checker error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.safety import SafetyChecker
from export.graphs.safety_checker import (
    FLAGGED,
    SPECIAL_CARE,
    SPECIAL_CARE_ADJUSTMENT,
    build_default_checker,
    calibration_images,
    export_safety_checker,
)

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("safety")
    checkpoint = build_default_checker(root / "checkpoint")
    entry = export_safety_checker(checkpoint, root / "export")
    return checkpoint, root / "export", entry


@pytest.fixture(scope="module")
def checker(exported) -> SafetyChecker:
    _, out, entry = exported
    return SafetyChecker.from_manifest(out, entry, providers=CPU)


@pytest.fixture(scope="module")
def reference(exported):
    """diffusers' checker and the image processor class diffusers' pipelines get here, loaded from the same folder."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    checkpoint, _, _ = exported
    model = StableDiffusionSafetyChecker.from_pretrained(checkpoint).eval()
    return model, CLIPImageProcessorPil.from_pretrained(checkpoint)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    extra = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(225, 333), (97, 97), (517, 223), (224, 224)]]
    return calibration_images() + extra


def test_entry_format(exported):
    _, out, entry = exported
    assert (out / entry["file"]).exists()
    json.dumps(entry)
    pre = entry["preprocess"]
    assert pre["size"] == {"shortest_edge": 224} and pre["crop_size"] == {"height": 224, "width": 224}
    assert pre["resample"] == 3 and pre["image_size"] == 224
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_graph_matches_diffusers(checker, reference, monkeypatch):
    import diffusers.pipelines.stable_diffusion.safety_checker as sc
    import torch

    model, processor = reference
    images = _images()
    clip_input = processor(images, return_tensors="np")["pixel_values"]
    scores, special, flags = checker.run(clip_input)

    # diffusers' forward keeps its cosine similarities to itself: record them on the way (special care first).
    seen = []
    original = sc.cosine_distance

    def recording(a, b):
        out = original(a, b)
        seen.append(out.float().numpy())
        return out

    monkeypatch.setattr(sc, "cosine_distance", recording)
    blank = [np.full((8, 8, 3), 0.5, dtype=np.float32) for _ in images]
    returned, torch_flags = model(clip_input=torch.from_numpy(clip_input), images=blank)
    _, onnx_path_flags = model.forward_onnx(torch.from_numpy(clip_input), torch.ones(len(images), 3, 8, 8))

    assert list(flags) == torch_flags == onnx_path_flags.tolist()
    assert [bool((r == 0).all()) for r in returned] == torch_flags  # diffusers blacks out what it flags

    special_cos, concept_cos = seen[:2]  # forward's pair; forward_onnx recorded the same again
    ref_special = special_cos - model.special_care_embeds_weights.detach().numpy()
    care = (ref_special > 0).any(axis=1, keepdims=True)
    ref_scores = concept_cos - model.concept_embeds_weights.detach().numpy() + SPECIAL_CARE_ADJUSTMENT * care
    np.testing.assert_allclose(special, ref_special, atol=2e-5)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-5)
    # Away from zero, so diffusers' rounding to 3 decimals cannot change any comparison.
    assert np.abs(scores).min() > 1e-3 and np.abs(special).min() > 1e-3

    # Both outcomes occur, and the special-care adjustment decides one of them.
    n = len(calibration_images())
    assert flags[:n].tolist() == [i in (FLAGGED, SPECIAL_CARE) for i in range(n)]
    assert (special[:n] > 0).any(axis=1).tolist() == [i == SPECIAL_CARE for i in range(n)]
    deciding = scores[SPECIAL_CARE].max()
    assert 0 < deciding < SPECIAL_CARE_ADJUSTMENT  # positive only thanks to the +0.01
    assert (scores[FLAGGED] > SPECIAL_CARE_ADJUSTMENT).any()  # flagged outright


def test_preprocess_matches_clip_image_processor(checker, reference):
    _, processor = reference
    worst = 0.0
    for image in _images() + [np.zeros((5, 700, 3), dtype=np.uint8) + 200, np.full((333, 1, 3), 17, dtype=np.uint8)]:
        ours = checker.preprocess(image[None])
        theirs = processor([image], return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 224, 224) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst == 0.0  # same Pillow resize, same float64 -> float32 order: bit-identical


def test_check_on_pixels(checker):
    images = calibration_images()
    flags = [checker.check(image[None])[0] for image in images]
    assert flags == [i in (FLAGGED, SPECIAL_CARE) for i in range(len(images))]
    batch = np.stack([images[FLAGGED][:200, :200], images[2][:200, :200]])
    assert len(checker.check(batch)) == 2 and checker.check(batch[:0]) == []


@pytest.mark.parametrize("mode", ["black", "blur"])
def test_apply_replaces_only_flagged(mode):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    before = pixels.copy()
    out = SafetyChecker.apply(pixels, [True, False, True], mode)
    np.testing.assert_array_equal(pixels, before)  # the input is left alone
    np.testing.assert_array_equal(out[1], pixels[1])
    assert out.shape == pixels.shape and out.dtype == np.uint8
    for i in (0, 2):
        if mode == "black":
            assert not out[i].any()
        else:
            assert out[i].std() < 0.2 * pixels[i].astype(float).std()  # detail gone
            assert abs(out[i].mean() - pixels[i].mean()) < 10  # but still the image's colours, not black
    with pytest.raises(ValueError):
        SafetyChecker.apply(pixels, [True, False, False], "pixelate")


def test_missing_checker_is_an_error(default_export, tmp_path):
    """An engine exported without a checker refuses enable_safety_checker; one with it accepts the request."""
    from engine import Engine
    from engine.request import GenerationRequest, InvalidRequest

    manifest = json.loads((default_export / "manifest.json").read_text())
    assert manifest.get("safety_checker"), "the default export is made with --safety-checker"
    bare = tmp_path / "no-checker"
    bare.mkdir()
    for f in default_export.iterdir():
        if f.name != "manifest.json":
            (bare / f.name).symlink_to(f)
    manifest["safety_checker"] = None
    (bare / "manifest.json").write_text(json.dumps(manifest))

    without = Engine.load(bare, providers=CPU)
    assert not without.has_safety_checker
    request = GenerationRequest(prompt="a cat", enable_safety_checker=True)
    with pytest.raises(InvalidRequest, match="safety"):
        without.check(request)
    with_checker = Engine.load(default_export, providers=CPU)
    assert with_checker.has_safety_checker
    with_checker.check(request)
