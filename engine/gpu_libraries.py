"""Whether a GPU execution provider can really run here, decided from the libraries it needs, not from the list
ONNX Runtime prints.

`onnxruntime.get_available_providers()` lists every provider the wheel was built with (TensorRT and CUDA on the
Linux x86_64 GPU wheel), whether or not their libraries are on this machine; a session asked for CUDA whose libraries
are missing logs an error (hidden at the engine's log level) and silently runs on the CPU. So, before a GPU session:

1. the CUDA and cuDNN libraries of the nvidia-* wheels (or of a compatible torch) are preloaded into this process
   (`onnxruntime.preload_dlls`, once; its chatter is kept out of the output), since the provider libraries have no
   RUNPATH and would not find them otherwise;
2. every library the provider's own shared object needs (its ELF DT_NEEDED entries: cuBLAS, cuBLASLt, cuRAND and
   the CUDA runtime for CUDA, TensorRT's libnvinfer and parser for TensorRT), and cuDNN 9, which the CUDA provider
   opens at run time, is opened: what does not open is named in `ProviderUnavailable`.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import struct
from functools import lru_cache
from pathlib import Path

import onnxruntime as ort

TENSORRT, CUDA = "TensorrtExecutionProvider", "CUDAExecutionProvider"
_PROVIDER_LIBRARY = {CUDA: "libonnxruntime_providers_cuda.so", TENSORRT: "libonnxruntime_providers_tensorrt.so"}
_OPENED_AT_RUN_TIME = {CUDA: ("libcudnn.so.9",), TENSORRT: ()}  # dlopen()ed, so not in DT_NEEDED
_SYSTEM = ("libc.so", "libm.so", "libdl.so", "librt.so", "libpthread.so", "libstdc++.so", "libgcc_s.so", "ld-linux")
DRIVER = "libcuda.so.1"


class ProviderUnavailable(RuntimeError):
    """A GPU provider was asked for, and this machine cannot run it."""


def needed_libraries(path: str | Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object (what the dynamic loader must find)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next((s for s in sections if s[1] == 6), None)  # SHT_DYNAMIC
    if dynamic is None:
        return []
    strtab = sections[dynamic[6]]  # sh_link: the dynamic string table
    names = []
    for offset in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + value
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


def provider_libraries(provider: str) -> list[str]:
    """The non-system libraries `provider` needs on this build (the driver included), or [] for the CPU."""
    name = _PROVIDER_LIBRARY.get(provider)
    if name is None:
        return []
    path = Path(ort.__file__).parent / "capi" / name
    if not path.exists():
        return [name]  # a build without this provider
    needed = [lib for lib in needed_libraries(path) if not lib.startswith(_SYSTEM)]
    return list(dict.fromkeys([*needed, *_OPENED_AT_RUN_TIME[provider]]))


@lru_cache(maxsize=1)
def preload() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels into this process (once), before any GPU session looks."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per library it cannot find
            ort.preload_dlls()


def _opens(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def missing_libraries(provider: str) -> list[str]:
    """What `provider` needs and this process cannot open (after the preload)."""
    libraries = provider_libraries(provider)
    if not libraries:
        return []
    if not _opens(DRIVER):
        return [DRIVER]  # no driver: nothing else matters, and loading CUDA libraries without one only logs errors
    preload()
    missing = [lib for lib in libraries if not _opens(lib)]
    if provider == TENSORRT:
        missing += [lib for lib in missing_libraries(CUDA) if lib not in missing]  # it runs beside the CUDA one
    return missing


def require(provider: str) -> None:
    """Raise ProviderUnavailable naming what `provider` lacks here; nothing for the CPU provider."""
    missing = missing_libraries(provider)
    if missing:
        raise ProviderUnavailable(unavailable_message(provider, missing))


def unavailable_message(provider: str, missing: list[str]) -> str:
    cuda = getattr(getattr(ort.capi, "build_and_package_info", None), "cuda_version", None)
    if missing == [DRIVER]:
        return f"{provider} was asked for, but this machine has no NVIDIA driver ({DRIVER} does not load)"
    built = f" onnxruntime-gpu {ort.__version__} is built for CUDA {cuda};" if cuda else ""
    major = str(cuda or "13").split(".")[0]
    driver = {"12": " with a driver >= 525", "13": " with a driver >= 580"}.get(major, "")
    return (f"{provider} was asked for, but these libraries do not load: {', '.join(missing)}.{built} install "
            f"the matching CUDA runtime, cuBLAS and cuDNN 9 (the nvidia-*-cu{major} wheels, or a CUDA {major} + "
            f"cuDNN image{driver}), or ask for CPUExecutionProvider")
