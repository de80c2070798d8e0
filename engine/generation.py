"""One request in flight (`Generation`), and a batch of them row by row: latents, timesteps and text conditioning
in, each generation's share of the noise prediction out.

A transformer batch holds every generation's prompt rows, then the negative-prompt rows of the guided ones; each
generation keeps its own text length, and the batch pads every row to the longest, masked. A row's arithmetic does
not depend on its companions, so generations can join and leave a batch at any step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.binding import pad_conditioning
from engine.request import GenerationRequest
from engine.schedulers import Scheduler


@dataclass(eq=False)
class Generation:
    """One request in flight, as plain data: its conditioning, its latents and its sampler's state.

    `context`/`mask` hold the prompt's T5 states, and for a guided request the negative prompt's after them:
    (1 or 2, L, C) and (1 or 2, L).
    """

    request: GenerationRequest
    seed: int
    size_bin: tuple[int, int]  # (H, W) in pixels the transformer runs at
    rng: np.random.Generator  # the request's own stream: initial latents, then SA-Solver's per-step noise
    sampler: Scheduler
    latents: np.ndarray  # (num_images, C, H/8, W/8) float32
    context: np.ndarray
    mask: np.ndarray
    step_index: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    denoise_started: float | None = None

    @property
    def guided(self) -> bool:
        return self.request.do_guidance

    @property
    def total_steps(self) -> int:
        return len(self.sampler.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def rows(self) -> int:
        """Rows this generation adds to a transformer batch."""
        return len(self.latents) * (2 if self.guided else 1)


def batch_conditioning(generations: Sequence[Generation]) -> tuple[np.ndarray, np.ndarray]:
    """Text states (rows, L, C) and int64 masks (rows, L) in row order, L the longest member's text length."""
    length = max(g.context.shape[1] for g in generations)
    parts = [(g, 0) for g in generations] + [(g, 1) for g in generations if g.guided]
    rows = sum(len(g.latents) for g, _ in parts)
    context = np.zeros((rows, length, generations[0].context.shape[2]), np.float32)
    mask = np.zeros((rows, length), np.int64)
    row = 0
    for g, which in parts:
        n, width = len(g.latents), g.context.shape[1]
        context[row : row + n, :width] = g.context[which]
        mask[row : row + n, :width] = g.mask[which]
        row += n
    return context, mask


class BatchedText:
    """Each group's batched text states and masks (one group per size bin), rebuilt only when its membership
    changes: the same arrays step after step, so that a bound transformer sends them to the device once, even while
    several groups take turns. The groups stepped least recently are forgotten first."""

    def __init__(self, groups: int = 4):
        self.groups = groups
        self._cached: OrderedDict[tuple[int, int], tuple[tuple[Generation, ...], np.ndarray, np.ndarray]] = \
            OrderedDict()

    def get(self, generations: Sequence[Generation], *, pad: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`pad`: to the shape a captured graph is made for (engine.binding.graph_shape)."""
        key = generations[0].size_bin
        cached = self._cached.get(key)
        if cached is not None and len(cached[0]) == len(generations) and all(
                a is b for a, b in zip(cached[0], generations, strict=True)):
            self._cached.move_to_end(key)
            return cached[1], cached[2]
        context, mask = batch_conditioning(generations)
        if pad:
            context, mask = pad_conditioning(context, mask)
        self._cached[key] = (tuple(generations), context, mask)
        while len(self._cached) > self.groups:
            self._cached.popitem(last=False)
        return context, mask

    def clear(self) -> None:
        self._cached.clear()


def prompt_rows(generations: Sequence[Generation]) -> int:
    """Rows of the batch's prompt half; the negative-prompt rows of the guided generations follow them."""
    return sum(len(g.latents) for g in generations)


def batch_latents(generations: Sequence[Generation]) -> tuple[np.ndarray, np.ndarray]:
    """Latents (rows, C, h, w) and float32 timesteps (rows,) in row order, each generation at its own timestep."""
    x = np.concatenate([g.latents for g in generations] + [g.latents for g in generations if g.guided])
    return x, batch_timesteps(generations)


def batch_timesteps(generations: Sequence[Generation]) -> np.ndarray:
    """Float32 timesteps (rows,) in row order: the prompt rows, then the guided generations' negative rows."""
    return np.concatenate([np.full(len(g.latents), g.sampler.timesteps[g.step_index], np.float32)
                           for g in [*generations, *(g for g in generations if g.guided)]])


def advance(generations: Sequence[Generation], noise_pred: np.ndarray, latent_channels: int) -> None:
    """Each generation takes its rows of the batch's noise prediction, applies its own guidance scale and steps its
    own sampler (with its own noise stream)."""
    split = prompt_rows(generations)
    cond_rows, uncond_rows = noise_pred[:split], noise_pred[split:]
    row = uncond_row = 0
    for g in generations:
        n = len(g.latents)
        eps = cond_rows[row : row + n]
        if g.guided:
            uncond = uncond_rows[uncond_row : uncond_row + n]
            eps = uncond + np.float32(g.request.guidance_scale) * (eps - uncond)
            uncond_row += n
        row += n
        eps = eps[:, :latent_channels]  # learned sigma: keep the prediction half (epsilon or v)
        noise = g.rng.standard_normal(g.latents.shape, dtype=np.float32) if g.sampler.needs_noise else None
        g.latents = g.sampler.step(eps, g.latents, noise)
        g.step_index += 1
        if g.done:
            g.timings["denoising"] = time.perf_counter() - g.denoise_started
