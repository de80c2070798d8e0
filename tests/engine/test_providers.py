"""A GPU provider that cannot run here is refused with the libraries it lacks, never a silent fall back to the CPU;
and a provider counts as available only when its libraries load, not because the wheel lists it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import gpu_libraries
from engine.gpu_libraries import CUDA, TENSORRT, ProviderUnavailable
from engine.runtime import CPU, create_session, default_providers

NO_GPU = "this machine has a GPU driver: the refusal is the CPU machine's behaviour"


def test_the_provider_libraries_are_read_from_the_wheel() -> None:
    cuda = gpu_libraries.provider_libraries(CUDA)
    assert {"libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9", "libcuda.so.1"} <= set(cuda)
    assert not any(lib.startswith(("libc.so", "libstdc++")) for lib in cuda)  # system libraries are not counted
    assert {"libnvinfer.so.10", "libnvonnxparser.so.10"} <= set(gpu_libraries.provider_libraries(TENSORRT))
    assert gpu_libraries.provider_libraries(CPU) == []


@pytest.mark.skipif(gpu_libraries._opens(gpu_libraries.DRIVER), reason=NO_GPU)
def test_asking_for_cuda_on_a_cpu_machine_is_refused_with_the_reason(default_export) -> None:
    from engine import Engine

    with pytest.raises(ProviderUnavailable, match="no NVIDIA driver"):
        Engine.load(default_export, [CUDA, CPU])
    with pytest.raises(ProviderUnavailable, match=CUDA):
        create_session(default_export / "vae_decoder.onnx", [CUDA, CPU], graph="vae_decoder")
    assert default_providers() == (CPU,)  # listed by the wheel, but not available


def test_with_a_driver_the_missing_libraries_are_named(monkeypatch) -> None:
    present = {gpu_libraries.DRIVER, "libcudart.so.13"}
    monkeypatch.setattr(gpu_libraries, "_opens", lambda library: library in present)
    monkeypatch.setattr(gpu_libraries, "preload", lambda: None)
    with pytest.raises(ProviderUnavailable) as refused:
        gpu_libraries.require(CUDA)
    message = str(refused.value)
    for lib in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudnn.so.9"):
        assert lib in message
    assert "libcudart.so.13" not in message and "CUDA 13" in message
    assert "libnvinfer.so.10" in "".join(gpu_libraries.missing_libraries(TENSORRT))
    present.update(gpu_libraries.provider_libraries(CUDA))
    gpu_libraries.require(CUDA)  # everything loads: no refusal
    assert gpu_libraries.missing_libraries(TENSORRT) == ["libnvinfer.so.10", "libnvonnxparser.so.10"]


def test_elf_needed_entries_of_a_real_library() -> None:
    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    needed = gpu_libraries.needed_libraries(capi / "libonnxruntime_providers_shared.so")
    assert "libc.so.6" in needed
    with pytest.raises(ValueError, match="ELF"):
        gpu_libraries.needed_libraries(capi / "__init__.py")


@pytest.mark.skipif(gpu_libraries._opens(gpu_libraries.DRIVER), reason=NO_GPU)
def test_serve_refuses_to_start_on_a_provider_it_cannot_run(default_export, tmp_path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--engine", str(default_export), "--store",
                           str(tmp_path / "store"), "--port", "0", "--http-port", "off", "--log-format", "text",
                           "--providers", f"{CUDA},{CPU}"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no NVIDIA driver" in done.stderr and "Traceback" not in done.stderr
