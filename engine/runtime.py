"""ONNX Runtime sessions: which execution providers to use, their options, and how sessions are made.

Provider options are built here and nowhere else (`provider_options`), with the names ONNX Runtime's CUDA and
TensorRT providers parse (a test checks them against the provider libraries of the installed build):

* CUDA: the device, and `enable_cuda_graph` for the transformer when CUDA graphs are asked for (each captured graph
  is then picked per run with the `gpu_graph_id` run option, see engine.binding).
* TensorRT: fp16 for the transformer, an engine cache and a timing cache in a folder beside the export (built
  once, reused at every start), CUDA graphs, and one optimization profile per graph whose min/opt/max shapes come
  from the export's bin table and the server's batch limits (`shape_profiles`), so that no request shape falls
  outside a built engine.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnxruntime as ort

from engine.gpu_libraries import ProviderUnavailable, missing_libraries, require

log = logging.getLogger(__name__)

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
Shape = tuple[int, ...]


@lru_cache(maxsize=1)
def default_providers() -> tuple[str, ...]:
    """TensorRT, then CUDA, then CPU: the GPU ones only where this build has them and every library they need loads
    here (a driver, CUDA, cuDNN; libnvinfer for TensorRT), not merely because the wheel lists them."""
    built = set(ort.get_available_providers())
    chosen = tuple(p for p in PREFERENCE if p in built and (p == CPU or not missing_libraries(p)))
    return chosen or (CPU,)


@dataclass(frozen=True)
class Acceleration:
    """How the GPU providers are configured (ignored on CPU)."""

    device_id: int = 0
    cuda_graphs: bool = False  # capture the transformer per (bin, rows, text length) bucket and replay it
    tensorrt_fp16: bool = True  # the transformer's TensorRT engine in fp16 (T5 and the VAE keep fp32)
    cache_dir: Path | None = None  # TensorRT engines and timing cache; default: <export>/trt-cache


def step_rows(max_batch_images: int) -> int:
    """The most transformer rows one step runs for `max_batch_images` images: a guided image is two rows. What
    sizes TensorRT's profiles, the same for `pixart serve` and `pixart build-engines`."""
    return 2 * max_batch_images


Profile = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def shape_profiles(bins: Mapping[str, list[int]], *, max_rows: int, latent_channels: int, vae_scale: int,
                   patch_size: int, inner_dim: int, caption_channels: int, max_text: int
                   ) -> dict[str, Profile]:
    """Per graph, the TensorRT optimization profile that covers every request: one to `max_rows` transformer rows,
    text up to `max_text` tokens, every bin of the table. One profile per graph: ONNX Runtime's TensorRT provider
    builds several but keeps its execution context on the first (microsoft/onnxruntime#31624, open in 1.31), so
    shapes of any other fail. The transformer's spans every bin, its positions' tokens following the latents' sides
    at min, opt and max; "opt" is one guided image of the squarest bin with a 32-token text. T5 and the VAE (one image
    per call) take one profile each."""
    sides = [(h // vae_scale, w // vae_scale) for h, w in bins.values()]
    t_opt = min(32, max_text)
    square = min(sides, key=lambda s: abs(s[0] - s[1]))
    low = (min(h for h, _ in sides), min(w for _, w in sides))
    high = (max(h for h, _ in sides), max(w for _, w in sides))

    def tokens(side: tuple[int, int]) -> int:
        return side[0] * side[1] // patch_size**2

    return {
        "transformer": {
            "latents": ((1, latent_channels, *low), (2, latent_channels, *square), (max_rows, latent_channels, *high)),
            "timestep": ((1,), (2,), (max_rows,)),
            "encoder_hidden_states": ((1, 1, caption_channels), (2, t_opt, caption_channels),
                                      (max_rows, max_text, caption_channels)),
            "encoder_attention_mask": ((1, 1), (2, t_opt), (max_rows, max_text)),
            "pos_embed": tuple((1, tokens(side), inner_dim) for side in (low, square, high)),
        },
        "text_encoder": {
            "input_ids": ((1, 1), (2, t_opt), (max_rows, max_text)),
            "attention_mask": ((1, 1), (2, t_opt), (max_rows, max_text)),
        },
        "vae_decoder": {"latents": ((1, latent_channels, *low), (1, latent_channels, *square),
                                    (1, latent_channels, *high))},
    }


def _profile_string(profile: Profile, which: int) -> str:
    """TensorRT's "input:dxd,input:dxd" list of the min (0), opt (1) or max (2) shapes."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def provider_options(provider: str, graph: str, acceleration: Acceleration,
                     profiles: Mapping[str, Profile] | None = None, memory_arena: bool = True
                     ) -> dict[str, str]:
    """The options of `provider` for `graph` ("text_encoder", "transformer", "vae_decoder", ...)."""
    a = acceleration
    if provider == CUDA:
        # HEURISTIC: an exhaustive search runs again for every new input shape, i.e. for each bin the VAE meets
        options = {"device_id": str(a.device_id), "cudnn_conv_algo_search": "HEURISTIC",
                   "do_copy_in_default_stream": "1"}
        if not memory_arena:  # allocate what a run asks for, not the next power of two; shrunk after each run
            options["arena_extend_strategy"] = "kSameAsRequested"
        if a.cuda_graphs and graph == "transformer":
            options["enable_cuda_graph"] = "1"
        return options
    if provider == TENSORRT:
        cache = str(a.cache_dir) if a.cache_dir else "trt-cache"
        options = {
            "device_id": str(a.device_id),
            # fp16 for the transformer only: T5 and the VAE keep fp32 islands (layer norms, attention softmax)
            # that fp16 everywhere would undo, and they overflow without them
            "trt_fp16_enable": "1" if a.tensorrt_fp16 and graph == "transformer" else "0",
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": cache,
            "trt_engine_cache_prefix": graph,
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": cache,
            "trt_builder_optimization_level": "3",
            "trt_max_workspace_size": str(8 << 30),
        }
        if a.cuda_graphs and graph == "transformer":
            options["trt_cuda_graph_enable"] = "1"
        if profiles and graph in profiles:
            for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes",
                                         "trt_profile_max_shapes")):
                options[key] = _profile_string(profiles[graph], which)
        return options
    return {}


def shrink_after_runs(session: ort.InferenceSession, device_id: int = 0) -> ort.RunOptions | None:
    """Run options that hand a GPU session's arena back after each run (memory plans without an arena), or None on
    the CPU, where `memory_arena=False` already frees per run."""
    if device_of(session) == "cpu":
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{device_id}")
    return options


def session_options(intra_op_threads: int = 0, memory_arena: bool = True, on_gpu: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = memory_arena
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads
    so.log_severity_level = 3
    if on_gpu:  # the CPU threads of a GPU session only launch kernels: spinning would take cores from the host side
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def create_session(
    path: str | Path,
    providers: tuple[str, ...] | list[str] | None = None,
    intra_op_threads: int = 0,
    memory_arena: bool = True,
    *,
    graph: str = "",
    acceleration: Acceleration | None = None,
    profiles: Mapping[str, Profile] | None = None,
) -> ort.InferenceSession:
    """`memory_arena=False` hands each buffer back after use instead of keeping the run's peak for the next run."""
    providers = tuple(providers or default_providers())
    asked = providers[0]
    if asked != CPU:
        require(asked)  # refuse now, naming what is missing, rather than fall back to the CPU in silence
    acceleration = acceleration or Acceleration(cache_dir=Path(path).parent / "trt-cache")
    options = session_options(intra_op_threads, memory_arena, on_gpu=asked != CPU)
    with_options = [(p, provider_options(p, graph, acceleration, profiles, memory_arena)) for p in providers]
    # no fallback: ONNX Runtime would otherwise build a CPU session when the GPU one fails (or move a session to
    # the CPU when a GPU run fails), print the cause to stdout and go on
    session = ort.InferenceSession(str(path), options, providers=with_options, enable_fallback=0)
    used = session.get_providers()
    if used[0] != asked:
        raise ProviderUnavailable(f"{Path(path).name}: {asked} was asked for, but the session runs on {used[0]} "
                                  "(ONNX Runtime did not register it; run with PIXART_LOG_LEVEL=DEBUG and "
                                  "ORT's verbose logging to see why)")
    return session


@lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps them after large frees (250-650 MB stayed resident after
    a T5 session was deleted): on a shared-memory edge device that is memory the GPU side cannot have."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def provider_device(providers: list[str] | tuple[str, ...] | None = None) -> str:
    """"cuda" when the first provider (of these, or of the defaults) runs on the GPU, else "cpu"."""
    first = (providers or default_providers())[0]
    return "cuda" if first in (CUDA, TENSORRT) else "cpu"


def device_of(session: ort.InferenceSession) -> str:
    """"cuda" when the session's first provider runs on the GPU, else "cpu" (where IO binding binds host memory)."""
    return "cuda" if session.get_providers()[0] in (CUDA, TENSORRT) else "cpu"
