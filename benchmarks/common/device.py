"""The device a benchmark runs on: what ONNX Runtime can use there, sessions opened as the engine opens them, where
their nodes were placed, and the device memory a block of work takes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any


def environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    from engine.gpu_libraries import CUDA, TENSORRT, missing_libraries
    from engine.runtime import default_providers

    info: dict[str, Any] = {"onnxruntime": ort.__version__, "built_with": ort.get_available_providers(),
                            "usable": list(default_providers()),
                            "missing": {p: missing_libraries(p) for p in (CUDA, TENSORRT)}}
    cuda = getattr(ort.capi.build_and_package_info, "cuda_version", None)
    if cuda:
        info["built_for_cuda"] = cuda
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_cuda"] = torch.version.cuda
    return info


def providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def open_session(path: Path, device: str, cuda_graphs: bool = False):
    """A transformer or VAE session as the engine opens one, recording where each node was placed."""
    import onnxruntime as ort

    from engine.gpu_libraries import require
    from engine.runtime import Acceleration, provider_options, session_options

    wanted = providers(device)
    if wanted[0] != "CPUExecutionProvider":
        require(wanted[0])
    options = session_options(on_gpu=device == "cuda")
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    graph = "vae_decoder" if "vae" in path.name else "transformer"
    acceleration = Acceleration(cuda_graphs=cuda_graphs)
    session = ort.InferenceSession(str(path), options, providers=[
        (p, provider_options(p, graph, acceleration, memory_arena=graph != "vae_decoder")) for p in wanted])
    if session.get_providers()[0] != wanted[0]:
        raise RuntimeError(f"{path.name}: asked for {wanted[0]}, runs on {session.get_providers()[0]}")
    return session


def placement(session) -> dict[str, Any]:
    """Nodes per provider, and the host-device copies ONNX Runtime inserted (each one costs every step)."""
    nodes = Counter((sub.ep_name, node.op_type) for sub in session.get_provider_graph_assignment_info()
                    for node in sub.get_nodes())
    per_provider = Counter()
    for (ep, _), n in nodes.items():
        per_provider[ep] += n
    on_cpu = sorted({op for (ep, op) in nodes if ep == "CPUExecutionProvider"})
    copies = sum(n for (_, op), n in nodes.items() if op.startswith("Memcpy"))
    return {"providers": session.get_providers(), "nodes": dict(per_provider), "memcpy_nodes": copies,
            "ops_on_cpu": on_cpu if session.get_providers()[0] != "CPUExecutionProvider" else []}


class DeviceMemory:
    """Peak device memory in use while a block runs (polled; the VAE's peak lasts tens of milliseconds)."""

    def __enter__(self) -> DeviceMemory:
        import torch

        self._free = torch.cuda.mem_get_info
        self.base = self._used()
        self.peak, self._stop = self.base, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _used(self) -> int:
        free, total = self._free()
        return total - free

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)
