"""The GPU path, proven on the CPU where a CPU can prove it: the IO-bound denoising loop gives the very same images
as plain runs, provider options use names the installed ONNX Runtime's CUDA and TensorRT providers parse, and the
TensorRT optimization profiles cover every shape a request can take."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engine import GenerationRequest
from engine.runtime import CUDA, TENSORRT, Acceleration, provider_options, shape_profiles


def pixels(result) -> np.ndarray:
    return np.stack([im.pixels for im in result.images])


@pytest.fixture(scope="module")
def bound_engine(default_export):
    from engine import Engine

    return Engine.load(default_export, io_binding=True)


@pytest.mark.parametrize("sampler", ["DPM-SOLVER", "SA-SOLVER"])
def test_io_bound_loop_gives_the_same_images_as_plain_runs(engine, bound_engine, sampler):
    assert engine.bound_transformer is None and bound_engine.bound_transformer is not None
    request = GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=12, num_images=2,
                                scheduler=sampler, image_size=(256, 256))
    before = bound_engine.bound_transformer.uploads
    np.testing.assert_array_equal(pixels(bound_engine.generate(request)), pixels(engine.generate(request)))
    # per step only the latents and timesteps go up; the text and positions once for the whole request
    assert bound_engine.bound_transformer.uploads - before == 2 * 12 + 2 + (before == 0)


def test_bound_buffers_are_recycled_least_recently_used(engine, default_export):
    from engine import Engine

    bound = Engine.load(default_export, io_binding=True)
    bound.bound_transformer.max_slots = 1
    for size in ((256, 256), (448, 256), (256, 256)):  # three shape sets through one slot
        request = GenerationRequest(prompt="a ring", seed=2, num_inference_steps=3, image_size=size)
        np.testing.assert_array_equal(pixels(bound.generate(request)), pixels(engine.generate(request)))
        assert len(bound.bound_transformer.slots) == 1
    assert bound.bound_transformer._next_graph_id == 4  # graph ids are never reused


def test_io_bound_loop_with_requests_joining(engine, bound_engine):
    from tests.engine.test_continuous import SCHEDULES, companions, run_schedule

    subject = GenerationRequest(prompt="a green star", seed=5, num_inference_steps=6, image_size=(256, 256))
    everyone = [subject, *companions((256, 256), "SA-SOLVER")]
    for name in ("joins at step k", "others join later"):
        plain = run_schedule(engine, everyone, SCHEDULES[name])
        bound = run_schedule(bound_engine, everyone, SCHEDULES[name])
        for a, b in zip(plain, bound, strict=True):
            np.testing.assert_array_equal(pixels(a), pixels(b))


def _library_strings(name: str) -> set[str]:
    capi = Path(ort.__file__).parent / "capi"
    library = capi / f"libonnxruntime_providers_{name}.so"
    if not library.exists():
        pytest.skip(f"this onnxruntime build has no {name} provider library (onnxruntime-gpu on Linux x86_64 has)")
    return set(re.findall(rb"[a-z][a-z0-9_]{5,}", library.read_bytes()))


def test_provider_options_are_names_the_providers_parse(default_export):
    profiles = {"transformer": {"latents": ((1, 4, 16, 16), (2, 4, 32, 32), (8, 4, 64, 64))}}
    acceleration = Acceleration(cuda_graphs=True, cache_dir=Path("/tmp/cache"))
    for provider, library in ((CUDA, "cuda"), (TENSORRT, "tensorrt")):
        known = {s.decode() for s in _library_strings(library)}
        for graph in ("text_encoder", "transformer", "vae_decoder"):
            options = provider_options(provider, graph, acceleration, profiles)
            unknown = set(options) - known
            assert not unknown, (provider, unknown)
    trt = provider_options(TENSORRT, "transformer", acceleration, profiles)
    assert trt["trt_profile_opt_shapes"] == "latents:2x4x32x32" and trt["trt_cuda_graph_enable"] == "1"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == "/tmp/cache"
    assert provider_options(CUDA, "transformer", acceleration)["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in provider_options(CUDA, "vae_decoder", acceleration)
    assert provider_options("CPUExecutionProvider", "transformer", acceleration) == {}


def test_tensorrt_profiles_cover_every_bin_and_batch(engine):
    profiles = shape_profiles(engine.bins, max_rows=8, latent_channels=4, vae_scale=8, patch_size=2,
                              inner_dim=engine.inner_dim, caption_channels=48, max_text=300)

    def within(shape, bounds) -> bool:
        low, _, high = bounds
        return all(lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True))

    tr, vae = profiles["transformer"], profiles["vae_decoder"]
    for h, w in engine.bins.values():
        for rows in (1, 2, 8):
            assert within((rows, 4, h // 8, w // 8), tr["latents"])
            assert within((1, (h // 16) * (w // 16), engine.inner_dim), tr["pos_embed"])
        assert within((1, 4, h // 8, w // 8), vae["latents"])
    for length in (1, 32, 300):
        assert within((8, length, 48), tr["encoder_hidden_states"])
        assert within((8, length), tr["encoder_attention_mask"])
    for bounds in [*tr.values(), *vae.values()]:
        assert within(bounds[1], bounds)  # opt lies inside [min, max]


def test_cuda_graphs_are_refused_on_the_cpu(default_export):
    from engine import Engine

    with pytest.raises(ValueError, match="CUDA graphs"):
        Engine.load(default_export, providers=["CPUExecutionProvider"], acceleration=Acceleration(cuda_graphs=True))


def test_build_engines_says_what_it_needs_on_a_machine_without_tensorrt(default_export):
    import subprocess
    import sys

    from engine.runtime import TENSORRT, default_providers

    if TENSORRT in default_providers():
        pytest.skip("this machine has TensorRT: the command would build engines")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "pixart_cli.py"), "build-engines", "--engine",
                           str(default_export)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "TensorRT provider" in done.stderr
