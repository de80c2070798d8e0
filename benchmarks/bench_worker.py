"""A `pixart bench` worker: one side at one size in its own process (`python -m benchmarks.bench --worker SPEC`),
timing the stages, end to end and throughput, and recording cold start and peak memory to the spec's result file.
Progress goes to stdout as PROGRESS lines, which the parent forwards to its bar."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_options import EAGER
from benchmarks.bench_sides import EagerSide, EngineSide, Side
from benchmarks.common.prompts import PROMPTS

PROGRESS = "@@progress"


def stats(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    return {
        "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
        "n": len(samples), "samples": [round(float(x), 6) for x in a],
    }


class GpuMemory:
    """Peak GPU memory of this process, polled from nvidia-smi (it sees ONNX Runtime's arena and torch's alike)."""

    def __init__(self, interval: float = 0.2):
        self.peak_mib = 0.0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemory:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=5)
            self._sample()

    def _sample(self) -> None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].replace(".", "").isdigit():
                self.peak_mib = max(self.peak_mib, float(parts[1]))

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()


def run_worker(spec_path: Path) -> int:
    """Measure the side and size of the spec at `spec_path`; write its result file."""
    t_process = time.perf_counter()
    spec = json.loads(spec_path.read_text())

    def tick(n: int = 1) -> None:
        print(f"{PROGRESS} {n}", flush=True)

    side: Side = EagerSide(spec) if spec["side"] == EAGER else EngineSide(spec)
    size, steps, measures = spec["size"], spec["steps"], spec["measures"]
    all_latents = np.load(spec["latents"])
    images_dir = Path(spec["images"])
    images_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"side": spec["side"], "size": size, "steps": steps}

    def timed(fn: Callable[[], Any]) -> list[float]:
        for _ in range(spec["warmup"]):
            fn()
            tick()
        samples = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            tick()
        return samples

    with GpuMemory() as gpu:
        t_import = time.perf_counter()  # the side's heavy imports happened in its constructor
        side.load()
        t_load = time.perf_counter()
        first = side.generate([PROMPTS[0]], all_latents[:1], steps)
        t_first = time.perf_counter()
        np.save(images_dir / "b1.npy", first)
        tick()
        result["cold_start"] = {
            "imports_s": t_import - t_process, "load_s": t_load - t_import, "first_image_s": t_first - t_load,
            "load_to_first_image_s": t_first - t_import,
        }
        if {"text", "step", "decode"} & set(measures):
            side.prepare(size, max(spec["batches"]))
        stages: dict[str, Any] = {}
        if "text" in measures:
            stages["text"] = stats(timed(side.text))
        if "step" in measures:
            for b in spec["batches"]:
                stages[f"step_b{b}"] = stats(timed(lambda b=b: side.step(b)))
        if "decode" in measures:
            stages["decode"] = stats(timed(side.decode))
        result["stages"] = stages
        throughput = {}
        for b in spec["batches"]:
            if (b == 1 and "e2e" not in measures) or (b != 1 and "throughput" not in measures):
                continue
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
            lat = all_latents[:b]
            box: dict[str, np.ndarray] = {}
            samples = timed(lambda p=prompts, x=lat, box=box: box.__setitem__("img", side.generate(p, x, steps)))
            np.save(images_dir / f"b{b}.npy", box["img"])
            s = stats(samples)
            s["images_per_s"] = b / s["median"]
            throughput[str(b)] = s
            if b == 1 and isinstance(side, EngineSide):
                result["engine_timings_b1"] = side.last_timings[0]
        result["e2e"] = throughput
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["peak_gpu_mib"] = gpu.peak_mib if gpu.available else None
    result["info"] = side.info()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0
