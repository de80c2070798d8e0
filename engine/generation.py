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
from engine.step_cache import StepCache, data_conversions

Row = tuple["Generation", int, int]  # (generation, half: 0 prompt / 1 negative prompt, image)


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
    cache: StepCache | None = None  # None: every row computes every step
    steps_computed: int = 0  # row-steps run through the transformer
    steps_cached: int = 0  # row-steps taken from the step cache
    preview: np.ndarray | None = None  # (C, h, w): the first image's data estimate x0, when a preview is due

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


def prompt_rows(generations: Sequence[Generation]) -> int | None:
    """Rows of a batch's prompt half, the negative-prompt rows of the guided generations following them (None when
    none is guided)."""
    return sum(len(g.latents) for g in generations) if any(g.guided for g in generations) else None


def prompt_rows_of(rows: Sequence[Row]) -> int | None:
    """prompt_rows for some rows of a batch (the ones that compute a step), in batch order."""
    prompt = sum(1 for _, half, _ in rows if half == 0)
    return prompt if prompt < len(rows) else None


def batch_latents(generations: Sequence[Generation]) -> tuple[np.ndarray, np.ndarray]:
    """Latents (rows, C, h, w) and float32 timesteps (rows,) in row order, each generation at its own timestep."""
    x = np.concatenate([g.latents for g in generations] + [g.latents for g in generations if g.guided])
    return x, batch_timesteps(generations)


def batch_timesteps(generations: Sequence[Generation]) -> np.ndarray:
    """Float32 timesteps (rows,) in row order: the prompt rows, then the guided generations' negative rows."""
    return np.concatenate([np.full(len(g.latents), g.sampler.timesteps[g.step_index], np.float32)
                           for g in [*generations, *(g for g in generations if g.guided)]])


def batch_rows(generations: Sequence[Generation]) -> list[Row]:
    """Every transformer row of a batch in row order: each generation's images (prompt half), then the guided
    generations' images again (negative-prompt half)."""
    return [(g, half, i) for half in (0, 1) for g in generations if half == 0 or g.guided
            for i in range(len(g.latents))]


def rows_computing(rows: Sequence[Row], signals: Sequence[np.ndarray] | None = None) -> list[bool]:
    """Whether each row runs the model this step (with the "blocks" mechanism: the transformer's body): always
    without a step cache, else as its own request's history decides from its signal (per row of `rows`: its head
    residual; default: its latents). A guided image's two halves decide together, either one computing computes
    both (engine.step_cache says why)."""
    wants = {}
    for r, (g, half, i) in enumerate(rows):
        signal = g.latents[i] if signals is None else signals[r]
        wants[id(g), half, i] = g.cache is None or g.cache.rows[half * len(g.latents) + i].computes(
            signal, g.step_index, g.total_steps)
    return [wants[id(g), 0, i] or (g.guided and wants[id(g), 1, i]) for g, _, i in rows]


def row_caches(rows: Sequence[Row]) -> list:
    """Each row's own step-cache history (None where its request has no step cache)."""
    return [g.cache.rows[half * len(g.latents) + i] if g.cache is not None else None for g, half, i in rows]


def begin_step(generations: Sequence[Generation]) -> None:
    """Check that these generations can step together (one size bin, none finished); start their denoising clocks."""
    if len({g.size_bin for g in generations}) != 1:
        raise ValueError("generations stepped together must share a size bin")
    now = time.perf_counter()
    for g in generations:
        if g.done:
            raise ValueError("a finished generation was stepped again")
        if g.denoise_started is None:
            g.denoise_started = now


def gather_rows(rows: Sequence[Row], *, pad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Latents, timesteps, text states and masks of just these rows (a batch some rows skip), in their order;
    `pad`: the text to the shape a captured graph is made for (engine.binding.graph_shape)."""
    length = max(g.context.shape[1] for g, _, _ in rows)
    first = rows[0][0]
    context = np.zeros((len(rows), length, first.context.shape[2]), np.float32)
    mask = np.zeros((len(rows), length), np.int64)
    for r, (g, half, _) in enumerate(rows):
        width = g.context.shape[1]
        context[r, :width] = g.context[half]
        mask[r, :width] = g.mask[half]
    x = np.stack([g.latents[i] for g, _, i in rows])
    t = np.array([g.sampler.timesteps[g.step_index] for g, _, _ in rows], np.float32)
    if pad:
        context, mask = pad_conditioning(context, mask)
    return x, t, context, mask


def preview_due(g: Generation) -> bool:
    """Every `preview_every` steps, counting from 1; never on the last step (the image itself comes next)."""
    every = g.request.preview_every
    return bool(every) and (g.step_index + 1) % every == 0 and g.step_index + 1 < g.total_steps


def advance(generations: Sequence[Generation], noise_pred: np.ndarray, latent_channels: int,
            computing: Sequence[bool] | None = None, body_cached: Sequence[bool] | None = None) -> None:
    """Each generation takes its rows' model outputs (the computed rows of the batch's noise prediction, in order;
    a forecast from its step cache for the rows that skipped), applies its own guidance scale and steps its own
    sampler (with its own noise stream). `computing`: per row of `batch_rows`, default all; `body_cached`: rows
    whose output came with the body's work taken from their cache (counted as cached)."""
    rows = batch_rows(generations)
    computing = computing if computing is not None else [True] * len(rows)
    body_cached = body_cached if body_cached is not None else [False] * len(rows)
    outputs: dict[tuple[int, int], list[np.ndarray]] = {}
    computed = 0
    for (g, half, i), computes, cached in zip(rows, computing, body_cached, strict=True):
        t = float(g.sampler.timesteps[g.step_index])
        row = g.cache.rows[half * len(g.latents) + i] if g.cache is not None and g.cache.forecasts else None
        if row is not None:
            to_data, from_data = data_conversions(float(g.sampler.sigmas[g.step_index]),
                                                  g.sampler.config.get("prediction_type", "epsilon"))
        if computes:
            # learned sigma: keep the prediction half (epsilon or v)
            out = noise_pred[computed, :latent_channels]
            computed += 1
            if cached:
                g.steps_cached += 1
            else:
                g.steps_computed += 1
            if row is not None:
                row.record(g.latents[i], t, out, g.step_index, to_data)
        else:
            out = row.forecast(g.latents[i], t, from_data)
            g.steps_cached += 1
        outputs.setdefault((id(g), half), []).append(out)
    for g in generations:
        eps = np.stack(outputs[id(g), 0])
        if g.guided:
            uncond = np.stack(outputs[id(g), 1])
            eps = uncond + np.float32(g.request.guidance_scale) * (eps - uncond)
        if preview_due(g):  # what the sampler takes as the clean picture now, before it moves on
            to_data, _ = data_conversions(float(g.sampler.sigmas[g.step_index]),
                                          g.sampler.config.get("prediction_type", "epsilon"))
            g.preview = to_data(g.latents[0], eps[0])
        noise = g.rng.standard_normal(g.latents.shape, dtype=np.float32) if g.sampler.needs_noise else None
        g.latents = g.sampler.step(eps, g.latents, noise)
        g.step_index += 1
        if g.done:
            g.timings["denoising"] = time.perf_counter() - g.denoise_started
            g.cache = None  # its history is no longer needed
