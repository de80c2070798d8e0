"""ONNX Runtime sessions: which execution providers to use, their options, and how sessions are made.

Provider options are built here and nowhere else (`provider_options`), with the names ONNX Runtime's CUDA and
TensorRT providers parse (a test checks them against the provider libraries of the installed build):

* CUDA: the device, and `enable_cuda_graph` for the transformer when CUDA graphs are asked for (each captured graph
  is then picked per run with the `gpu_graph_id` run option, see engine.binding).
* TensorRT: fp16, an engine cache and a timing cache in a folder beside the export (built once, reused at every
  start), CUDA graphs, and one optimization profile per graph whose min/opt/max shapes come from the export's bin
  table and the server's batch limits (`shape_profiles`), so that no request shape falls outside a built engine.
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
    cuda_graphs: bool = False  # capture the transformer per (bin, rows, text length) and replay it
    tensorrt_fp16: bool = True
    cache_dir: Path | None = None  # TensorRT engines and timing cache; default: <export>/trt-cache


def shape_profiles(bins: Mapping[str, list[int]], *, max_rows: int, latent_channels: int, vae_scale: int,
                   patch_size: int, inner_dim: int, caption_channels: int, max_text: int
                   ) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """Per graph, per input: (min, opt, max) shapes covering every bin of the table, one to `max_rows` transformer
    rows (guided requests count twice) and text lengths up to `max_text`; "opt" is the square bin, one guided
    image and a 32-token text, the common request."""
    sides = [(h // vae_scale, w // vae_scale) for h, w in bins.values()]
    h_min, w_min = min(h for h, _ in sides), min(w for _, w in sides)
    h_max, w_max = max(h for h, _ in sides), max(w for _, w in sides)
    square = min(sides, key=lambda s: abs(s[0] - s[1]))
    tokens = sorted(h * w // patch_size**2 for h, w in sides)
    t_opt = min(32, max_text)
    return {
        "transformer": {
            "latents": ((1, latent_channels, h_min, w_min), (2, latent_channels, *square),
                        (max_rows, latent_channels, h_max, w_max)),
            "timestep": ((1,), (2,), (max_rows,)),
            "encoder_hidden_states": ((1, 1, caption_channels), (2, t_opt, caption_channels),
                                      (max_rows, max_text, caption_channels)),
            "encoder_attention_mask": ((1, 1), (2, t_opt), (max_rows, max_text)),
            "pos_embed": ((1, tokens[0], inner_dim), (1, square[0] * square[1] // patch_size**2, inner_dim),
                          (1, tokens[-1], inner_dim)),
        },
        "text_encoder": {
            "input_ids": ((1, 1), (2, t_opt), (max_rows, max_text)),
            "attention_mask": ((1, 1), (2, t_opt), (max_rows, max_text)),
        },
        "vae_decoder": {
            "latents": ((1, latent_channels, h_min, w_min), (1, latent_channels, *square),
                        (1, latent_channels, h_max, w_max)),
        },
    }


def _profile_string(profile: Mapping[str, tuple[Shape, Shape, Shape]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def provider_options(provider: str, graph: str, acceleration: Acceleration,
                     profiles: Mapping[str, Mapping[str, tuple[Shape, Shape, Shape]]] | None = None) -> dict[str, str]:
    """The options of `provider` for `graph` ("text_encoder", "transformer", "vae_decoder", ...)."""
    a = acceleration
    if provider == CUDA:
        options = {"device_id": str(a.device_id), "cudnn_conv_algo_search": "EXHAUSTIVE",
                   "do_copy_in_default_stream": "1"}
        if a.cuda_graphs and graph == "transformer":
            options["enable_cuda_graph"] = "1"
        return options
    if provider == TENSORRT:
        cache = str(a.cache_dir) if a.cache_dir else "trt-cache"
        options = {
            "device_id": str(a.device_id),
            "trt_fp16_enable": "1" if a.tensorrt_fp16 else "0",
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


def session_options(intra_op_threads: int = 0, memory_arena: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = memory_arena
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads
    so.log_severity_level = 3
    return so


def create_session(
    path: str | Path,
    providers: tuple[str, ...] | list[str] | None = None,
    intra_op_threads: int = 0,
    memory_arena: bool = True,
    *,
    graph: str = "",
    acceleration: Acceleration | None = None,
    profiles: Mapping[str, Mapping[str, tuple[Shape, Shape, Shape]]] | None = None,
) -> ort.InferenceSession:
    """`memory_arena=False` hands each buffer back after use instead of keeping the run's peak for the next run."""
    providers = tuple(providers or default_providers())
    asked = providers[0]
    if asked != CPU:
        require(asked)  # refuse now, naming what is missing, rather than fall back to the CPU in silence
    acceleration = acceleration or Acceleration(cache_dir=Path(path).parent / "trt-cache")
    options = session_options(intra_op_threads, memory_arena)
    with_options = [(p, provider_options(p, graph, acceleration, profiles)) for p in providers]
    session = ort.InferenceSession(str(path), options, providers=with_options)
    used = session.get_providers()
    if used[0] != asked:
        raise ProviderUnavailable(f"{Path(path).name}: {asked} was asked for, but the session runs on {used[0]} "
                                  "(ONNX Runtime could not create it; run with PIXART_LOG_LEVEL=DEBUG and "
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
