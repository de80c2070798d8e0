"""Stand-ins for the engine in the server's unit tests: it steps counters, so a test runs in milliseconds, and it
keeps the contract the server relies on (prepare / step / finish, a row done after its request's step count)."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.request import GeneratedImage, GenerationRequest, GenerationResult
from engine.vocabulary import result_file_name


@dataclass
class FakeGeneration:
    request: GenerationRequest
    step_index: int = 0

    @property
    def total_steps(self) -> int:
        return self.request.num_inference_steps

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps


class FakeEngine:
    has_safety_checker = False

    def __init__(self, step_delay: float = 0.0, fail_prepare: str = "", fail_step_at: int = 0,
                 finish_delay: float = 0.0):
        """`finish_delay`: seconds each finish takes (a slow decode: the window past a request's last step)."""
        self.step_delay, self.fail_prepare, self.fail_step_at = step_delay, fail_prepare, fail_step_at
        self.finish_delay = finish_delay
        self.steps: list[list[str]] = []
        self.closed = False

    def violations(self, request):
        return request.violations()

    def binned_size(self, request):
        return request.size

    def prepare(self, request):
        if request.prompt == self.fail_prepare:
            raise ValueError("refused by the engine")
        return FakeGeneration(request)

    def step(self, generations):
        self.steps.append([g.request.prompt for g in generations])
        if len(self.steps) == self.fail_step_at:
            raise RuntimeError("simulated device failure")
        time.sleep(self.step_delay)
        for g in generations:
            g.step_index += 1

    def finish(self, generations):
        time.sleep(self.finish_delay)
        return [GenerationResult([tiny_image(n) for n in range(g.request.num_images)],
                                 g.request.seed or 0, g.request.prompt, [False] * g.request.num_images,
                                 {"total": 0.001}) for g in generations]

    def preview(self, g):
        """A tiny JPEG every preview_every steps (not after the last), as the engine draws one."""
        every = g.request.preview_every
        if not every or g.step_index % every or g.step_index >= g.total_steps:
            return None
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (g.step_index * 7 % 256, 64, 128)).save(out, "JPEG")
        return out.getvalue()

    def warmup(self):
        pass

    def close(self):
        self.closed = True


def tiny_image(index: int) -> GeneratedImage:
    """A black 2x2 PNG, encoded for real."""
    pixels = np.zeros((2, 2, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return GeneratedImage(pixels, buf.getvalue(), "image/png", result_file_name(index, "png"))
