"""Opens the ONNX Runtime sessions an engine runs: the export's graphs with its providers, TensorRT profiles and
memory settings, the transformer's IO binding, and the safety checker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import onnxruntime as ort

from engine.binding import BoundSession
from engine.manifest import Manifest
from engine.runtime import Acceleration, Profile, create_session, device_of
from engine.safety import SafetyChecker

CPU_ONLY = ["CPUExecutionProvider"]


class GraphOpener:
    """Opens the graphs of one variant's files, all with the same providers, threads, acceleration and profiles."""

    def __init__(
        self,
        files: Mapping[str, Path],
        providers: list[str] | tuple[str, ...] | None,
        intra_op_threads: int,
        acceleration: Acceleration,
        profiles: Mapping[str, Profile],
    ):
        self.files, self.providers, self.intra_op_threads = files, providers, intra_op_threads
        self.acceleration, self.profiles = acceleration, profiles

    def open(self, graph: str, *, memory_arena: bool = True, on_cpu: bool = False) -> ort.InferenceSession:
        """`memory_arena=False`: buffers go back after each run; `on_cpu`: the CPU provider whatever the others."""
        return create_session(self.files[graph], CPU_ONLY if on_cpu else self.providers, self.intra_op_threads,
                              graph=graph, acceleration=self.acceleration, profiles=self.profiles,
                              memory_arena=memory_arena)

    def opener(self, graph: str, **options: bool) -> Callable[[], ort.InferenceSession]:
        """A function that opens `graph` each time it is called (for a session loaded per use)."""
        return partial(self.open, graph, **options)


def bind_transformer(
    transformer: ort.InferenceSession, io_binding: bool | None, acceleration: Acceleration,
    run_options: ort.RunOptions | None = None,
) -> BoundSession | None:
    """The transformer with its inputs and output in device buffers, or None where it runs plain: IO binding is on
    when asked, or by default on a GPU; CUDA graphs need it (and a GPU)."""
    device = device_of(transformer)
    if acceleration.cuda_graphs and device == "cpu":
        raise ValueError("CUDA graphs need the transformer on a GPU provider")
    use_binding = (device != "cpu") if io_binding is None else io_binding
    if not (use_binding or acceleration.cuda_graphs):
        return None
    shrink = run_options is not None and not acceleration.cuda_graphs  # a captured graph keeps its memory
    return BoundSession(transformer, device, acceleration.device_id, acceleration.cuda_graphs, shrink=shrink)


def open_safety_checker(manifest: Manifest, graphs: GraphOpener) -> SafetyChecker | None:
    """The export's safety checker (with the other graphs' providers and settings), or None when it was exported
    without one."""
    entry = manifest.get("safety_checker")
    return SafetyChecker.from_manifest(manifest.folder, entry, graphs.providers, graphs.intra_op_threads,
                                       graphs.acceleration) if entry else None
