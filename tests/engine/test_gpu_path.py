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


def test_graph_shapes_are_a_few_buckets() -> None:
    from engine.binding import graph_shape, pad_conditioning

    assert [graph_shape(rows, 32)[0] for rows in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert [graph_shape(2, length)[1] for length in (32, 64, 96, 160, 300)] == [32, 64, 128, 300, 300]
    context, mask = np.ones((3, 96, 4), np.float32), np.ones((3, 96), np.int64)
    padded_context, padded_mask = pad_conditioning(context, mask)
    assert padded_context.shape == (4, 128, 4) and padded_mask.shape == (4, 128)
    assert padded_mask[:3, :96].all() and not padded_mask[3].any() and not padded_mask[:, 96:].any()
    np.testing.assert_array_equal(padded_context[:3, :96], context)


def test_rows_and_text_padded_for_captured_graphs_give_the_same_images(engine, default_export):
    """With CUDA graphs the engine pads rows and text to a few shapes (so continuous batching captures a bounded
    number of graphs); on the CPU the same padding runs through IO binding, and every request's image is the one
    it gets alone, in the plain engine, bit for bit."""
    from engine import Engine
    from tests.engine.test_continuous import LONG_PROMPT, SCHEDULES, companions, run_schedule

    padded = Engine.load(default_export, io_binding=True)
    padded.graph_shapes = True  # what Acceleration(cuda_graphs=True) turns on; the CPU cannot capture graphs
    subject = GenerationRequest(prompt=LONG_PROMPT, seed=5, num_inference_steps=6, image_size=(256, 256))
    everyone = [subject, *companions((256, 256), "SA-SOLVER")]
    for name in ("all at step 0", "joins at step k"):
        plain = run_schedule(engine, everyone, SCHEDULES[name])
        for a, b in zip(plain, run_schedule(padded, everyone, SCHEDULES[name]), strict=True):
            np.testing.assert_array_equal(pixels(a), pixels(b))
    shapes = set(padded.bound_transformer.slots)
    rows = {dict((n, shape) for n, shape, _ in key)["latents"][0] for key in shapes}
    texts = {dict((n, shape) for n, shape, _ in key)["encoder_attention_mask"][1] for key in shapes}
    assert rows <= {1, 2, 4, 8, 16} and texts <= {32, 64, 128, 300}


def test_warm_up_makes_the_default_bins_graphs_for_every_row_bucket(default_export):
    """Every bucket a step can be padded to, the one above `max_rows` too (6 rows pad to 8)."""
    from engine import Engine
    from engine.binding import CAPTURE_RUNS

    padded = Engine.load(default_export, io_binding=True, max_rows=6)
    padded.graph_shapes = True
    padded.warmup()
    made = {dict((n, shape) for n, shape, _ in key)["latents"] for key in padded.bound_transformer.slots}
    h, w = (side // 8 for side in padded.binned_size(GenerationRequest(prompt="the default size")))
    assert {(rows, 4, h, w) for rows in (1, 2, 4, 8)} <= made
    assert all(slot.runs >= CAPTURE_RUNS for slot in padded.bound_transformer.slots.values())  # captured


def test_groups_stepped_in_turn_send_their_text_once(default_export):
    from engine import Engine

    bound = Engine.load(default_export, io_binding=True)
    square = bound.prepare(GenerationRequest(prompt="a square", seed=1, num_inference_steps=5, image_size=(256, 256)))
    wide = bound.prepare(GenerationRequest(prompt="a wide one", seed=2, num_inference_steps=5, image_size=(448, 256)))
    bound.step([square])
    bound.step([wide])  # each group's first step: latents, timesteps, text, mask and positions go up
    before = bound.bound_transformer.uploads
    for _ in range(3):
        bound.step([square])
        bound.step([wide])
    assert bound.bound_transformer.uploads - before == 3 * 2 * 2  # per step: latents and timesteps only


class RecordingSession:
    """The parts of an InferenceSession a BoundSession calls, recording the captured graphs released."""

    def __init__(self):
        self.released: list[int] = []

    def get_outputs(self):
        return [type("Output", (), {"name": "noise_pred"})()]

    def io_binding(self):
        return type("Binding", (), {"bind_ortvalue_input": lambda *a: None,
                                    "bind_ortvalue_output": lambda *a: None})()

    def run_with_iobinding(self, binding, options):
        pass

    def release_captured_graph(self, graph_id: int) -> None:
        self.released.append(graph_id)


def test_slots_stay_within_their_device_memory_and_evicted_graphs_are_released() -> None:
    from engine.binding import BoundSession

    session = RecordingSession()
    row = (64 + 32) * 4  # each slot: 64 input floats and 32 output floats per row
    bound = BoundSession(session, cuda_graphs=True, max_bytes=6 * row)
    for rows in (1, 2, 3, 1, 4):  # 1 + 2 + 3 rows fill the budget; 1 is used again; 4 needs 2 and 3 out
        bound.run({"latents": np.zeros((rows, 64), np.float32)}, (rows, 32))
    assert [slot.graph_id for slot in bound.slots.values()] == [1, 4] and bound.nbytes == 5 * row
    assert session.released == [2, 3]  # least recently used out, each with its captured graph
    bound.close()
    assert session.released == [2, 3, 1, 4] and not bound.slots


def _library_strings(name: str) -> set[str]:
    capi = Path(ort.__file__).parent / "capi"
    library = capi / f"libonnxruntime_providers_{name}.so"
    if not library.exists():
        pytest.skip(f"this onnxruntime build has no {name} provider library (onnxruntime-gpu on Linux x86_64 has)")
    return set(re.findall(rb"[a-z][a-z0-9_]{5,}", library.read_bytes()))


def test_provider_options_are_names_the_providers_parse(default_export):
    profiles = {"transformer": {"latents": ((1, 4, 16, 16), (2, 4, 32, 32), (8, 4, 48, 48)),
                                "timestep": ((1,), (2,), (8,))}}
    acceleration = Acceleration(cuda_graphs=True, cache_dir=Path("/tmp/cache"))
    for provider, library in ((CUDA, "cuda"), (TENSORRT, "tensorrt")):
        known = {s.decode() for s in _library_strings(library)}
        for graph in ("text_encoder", "transformer", "vae_decoder"):
            for memory_arena in (True, False):
                options = provider_options(provider, graph, acceleration, profiles, memory_arena)
                unknown = set(options) - known
                assert not unknown, (provider, unknown)
    trt = provider_options(TENSORRT, "transformer", acceleration, profiles)
    assert trt["trt_profile_opt_shapes"] == "latents:2x4x32x32,timestep:2"
    assert trt["trt_cuda_graph_enable"] == "1"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == "/tmp/cache"
    # fp16 for the transformer only: T5 and the VAE keep the fp32 islands that keep them finite
    assert [provider_options(TENSORRT, g, acceleration)["trt_fp16_enable"]
            for g in ("transformer", "text_encoder", "vae_decoder")] == ["1", "0", "0"]
    cuda = provider_options(CUDA, "transformer", acceleration)
    assert cuda["enable_cuda_graph"] == "1" and cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert "enable_cuda_graph" not in provider_options(CUDA, "vae_decoder", acceleration)
    assert provider_options(CUDA, "vae_decoder", acceleration, memory_arena=False)["arena_extend_strategy"] == \
        "kSameAsRequested"
    assert provider_options("CPUExecutionProvider", "transformer", acceleration) == {}


def within(shape, bounds) -> bool:
    low, _, high = bounds
    return all(lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True))


def test_tensorrt_profiles_cover_every_bin_and_batch_without_contradiction(engine):
    """One profile per graph (ONNX Runtime's TensorRT provider runs the first profile only), covering every bin,
    batch and text; the transformer's positions agree with its latents on the tokens at min, opt and max."""
    profiles = shape_profiles(engine.bins, max_rows=8, latent_channels=4, vae_scale=8, patch_size=2,
                              inner_dim=engine.inner_dim, caption_channels=48, max_text=300)
    tr, vae = profiles["transformer"], profiles["vae_decoder"]
    for h, w in engine.bins.values():
        for rows in (1, 2, 8):
            for length in (1, 32, 300):
                shapes = {"latents": (rows, 4, h // 8, w // 8), "timestep": (rows,),
                          "encoder_hidden_states": (rows, length, 48), "encoder_attention_mask": (rows, length),
                          "pos_embed": (1, (h // 16) * (w // 16), engine.inner_dim)}
                assert all(within(shape, tr[name]) for name, shape in shapes.items()), (h, w, rows, length)
        assert within((1, 4, h // 8, w // 8), vae["latents"])
    for which in range(3):
        _, _, lh, lw = tr["latents"][which]
        assert tr["pos_embed"][which][1] == (lh // 2) * (lw // 2)
    for profile in profiles.values():
        assert all(within(bounds[1], bounds) for bounds in profile.values())  # opt inside [min, max]
    options = provider_options(TENSORRT, "transformer", Acceleration(), profiles)
    assert options["trt_profile_max_shapes"].count("latents:") == 1


def test_tensorrt_profiles_reach_the_shapes_captured_graphs_are_padded_to(engine, monkeypatch):
    """With CUDA graphs 5 or 6 rows pad to 8, and a text of 120 tokens (an export's limit) to 128: the profile
    must admit them."""
    monkeypatch.setattr(engine, "max_sequence_length", 120)
    plain = engine.tensorrt_profiles(6)["transformer"]
    captured = engine.tensorrt_profiles(6, cuda_graphs=True)["transformer"]
    assert plain["encoder_attention_mask"][2] == (6, 120)
    assert captured["encoder_attention_mask"][2] == (8, 128) and captured["latents"][2][0] == 8


def test_build_engines_builds_what_serve_asks_for(default_export, tmp_path):
    """The same rows, variant, CUDA graphs and cache folder from `pixart serve` and `pixart build-engines`, so that
    the engines built ahead of time are the ones serve loads (TensorRT keys its cache on them)."""
    from engine.manifest import Manifest
    from pixart_cli import build_parser
    from server.cli import config_from_args, gpu_options

    parser = build_parser()
    serve = config_from_args(parser.parse_args(["serve", "--engine", str(default_export), "--store",
                                                str(tmp_path / "store"), "--trt-cache-dir", "/cache/trt"]))
    build = parser.parse_args(["build-engines", "--engine", str(default_export), "--cache-dir", "/cache/trt"])

    assert gpu_options(str(build.engine), build.max_batch_images, build.cuda_graphs, build.cache_dir) == {
        k: serve.engine_options[k] for k in ("max_rows", "acceleration")}
    assert serve.engine_options["max_rows"] == 8 and build.variant == "fp32"

    assert Manifest.load(default_export).files(provider=TENSORRT)[0] == build.variant  # serve's default there too


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


def test_the_default_graph_set_follows_the_provider(default_export, tmp_path):
    """fp16 on CUDA where exported (fp32 attention cannot use flash attention), the plain graphs on TensorRT (which
    makes its own), the fused ones on the CPU."""
    import json
    import shutil

    from engine.manifest import Manifest

    export = tmp_path / "export"
    shutil.copytree(default_export, export)
    manifest = json.loads((export / "manifest.json").read_text())
    assert Manifest.load(export).files(provider=CUDA)[0] == "optimized"  # no fp16 graphs in this export
    manifest["variants"]["fp16"] = dict(manifest["variants"]["optimized"])  # stand-ins: existing files
    (export / "manifest.json").write_text(json.dumps(manifest))
    chosen = {p: Manifest.load(export).files(provider=p)[0] for p in (CUDA, TENSORRT, "CPUExecutionProvider")}
    assert chosen == {CUDA: "fp16", TENSORRT: "fp32", "CPUExecutionProvider": "optimized"}
    assert Manifest.load(export).files("fp32", provider=CUDA)[0] == "fp32"  # asked for by name: that one


@pytest.mark.parametrize("sampler", ["DPM-SOLVER", "SA-SOLVER"])
def test_the_device_step_gives_the_host_steps_images(engine, default_export, sampler):
    """Guidance and the sampler update in the step graph, latents and sampler state kept where the transformer runs
    (here: the CPU's buffers): every request of every schedule (joins, leaves, a drop; padded for captured graphs
    too) gets the image of the host's numpy step, bit for bit."""
    from engine import Engine
    from tests.engine.test_continuous import LONG_PROMPT, SCHEDULES, companions, run_schedule

    device = Engine.load(default_export, io_binding=True, device_step=True)
    subject = GenerationRequest(prompt=LONG_PROMPT, seed=5, num_inference_steps=6, scheduler=sampler,
                                image_size=(256, 256))
    everyone = [subject, *companions((256, 256), "DPM-SOLVER" if sampler == "SA-SOLVER" else "SA-SOLVER")]
    cases = [(SCHEDULES[name], {}) for name in ("all at step 0", "joins at step k", "others join later")]
    cases.append(([0, 0, 0, 0], {2: 2}))
    for padded, schedule in ((False, cases), (True, cases[1:2])):
        device.graph_shapes = padded
        for joins, drop in schedule:
            host = run_schedule(engine, everyone, joins, drop)
            for a, b in zip(host, run_schedule(device, everyone, joins, drop), strict=True):
                assert (a is None) == (b is None) and (a is None or np.array_equal(pixels(a), pixels(b)))
    assert not device.device_steps.groups  # every group's buffers went with its last member


def test_the_device_step_survives_its_slot_being_evicted(engine, default_export):
    """Two bins taking turns with room for one slot: each step evicts the other bin's buffers, and the group whose
    slot is made again sends up its latents as they are now, not as they were when it joined."""
    from engine import Engine

    device = Engine.load(default_export, io_binding=True, device_step=True)
    device.bound_transformer.max_slots = 1
    requests = [GenerationRequest(prompt="a red circle", seed=1, num_inference_steps=4, image_size=(256, 256)),
                GenerationRequest(prompt="a blue square", seed=2, num_inference_steps=4, image_size=(256, 448),
                                  scheduler="SA-SOLVER")]

    def taking_turns(e) -> list:
        generations = [e.prepare(r) for r in requests]
        while not all(g.done for g in generations):
            for g in generations:
                e.step([g])
        return [e.finish([g])[0] for g in generations]

    before = device.bound_transformer.uploads
    for a, b in zip(taking_turns(engine), taking_turns(device), strict=True):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    # every step made its slot again: latents, timesteps, text, mask and positions each time
    assert device.bound_transformer.uploads - before == 2 * 4 * 5


def test_the_device_step_sends_only_the_timesteps_up(default_export):
    from engine import Engine

    device = Engine.load(default_export, io_binding=True, device_step=True)
    request = GenerationRequest(prompt="a star", seed=3, num_inference_steps=6, image_size=(256, 256))
    generation = device.prepare(request)
    device.step([generation])  # latents, timesteps, text, mask and positions go up once
    before = device.bound_transformer.uploads
    while not generation.done:
        device.step([generation])
    assert device.bound_transformer.uploads - before == 5  # then per step the timesteps alone
    with pytest.raises(ValueError, match="IO binding"):
        Engine.load(default_export, io_binding=False, device_step=True)
