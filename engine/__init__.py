"""Torch-free PixArt-Σ engine over exported ONNX graphs."""

from engine.request import Cancelled, GeneratedImage, GenerationRequest, GenerationResult, InvalidRequest

__all__ = ["Engine", "Cancelled", "GeneratedImage", "GenerationRequest", "GenerationResult", "InvalidRequest"]


def __getattr__(name: str):
    # Engine pulls in ONNX Runtime; importing the request types alone should not.
    if name == "Engine":
        from engine.pipeline import Engine

        return Engine
    raise AttributeError(name)
