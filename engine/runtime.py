"""ONNX Runtime sessions: which execution providers to use, and how sessions are made."""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _cuda_driver_present() -> bool:
    # Asking ONNX Runtime for CUDA on a machine without a driver makes it log errors on every session: look first.
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@lru_cache(maxsize=1)
def default_providers() -> tuple[str, ...]:
    """TensorRT, then CUDA, then CPU: the GPU ones only where this build has them and a CUDA driver is present."""
    built = set(ort.get_available_providers())
    gpu_ok = _cuda_driver_present()
    chosen = tuple(p for p in PREFERENCE if p in built and (p == "CPUExecutionProvider" or gpu_ok))
    return chosen or ("CPUExecutionProvider",)


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
) -> ort.InferenceSession:
    """`memory_arena=False` hands each buffer back after use instead of keeping the run's peak for the next run."""
    providers = tuple(providers or default_providers())
    options = session_options(intra_op_threads, memory_arena)
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    used = session.get_providers()
    if providers[0] not in used:
        log.warning("%s: asked for %s, running on %s", Path(path).name, providers[0], used[0])
    return session
