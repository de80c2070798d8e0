"""Guidance and the sampler update as one small ONNX graph, run where the transformer runs.

Between two transformer calls the engine otherwise brings the noise prediction to the host, mixes each request's
guidance, steps its sampler in numpy and sends the next latents back: on a GPU that is two copies over PCIe and a
few milliseconds of host arithmetic per step. Every sampler step is a `StepPlan` (engine/schedulers/base.py): the
next sample and the arrays kept for later steps are weighted sums of the sample, the model output, the step's noise
and the kept arrays, with float64 weights computed on the host. This graph applies those weights for every image row
of a batch at once, whatever sampler or step each row is at:

    model      = where(guided, uncond + g (cond - uncond), cond)[:, :4]   rows of the transformer's output (float32)
    sources    = [x, model, noise, state...]                              (N, R, C, h, w), float64
    outputs    = weights (R, O, N) @ sources                              "next" and each kept slot, float64
    next       = float32(outputs[0]);  next_state = outputs[1:]
    next_input = next[input_rows]                                         the transformer's next latents

Guidance is computed in float32 as numpy computes it, and the weighted sums in float64 as `apply_plan` does, so a
row's next sample matches the numpy step to float32 rounding (tested on the CPU for both samplers, guided and
unguided rows and every step of a run). The noise of SA-Solver rows is still drawn on the host, from each request's
own seeded stream, and uploaded: a row's noise must not depend on its companions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.binding import BoundSession, Slot, pad_rows
from engine.generation import Generation
from engine.runtime import CPU, CUDA, Acceleration, create_session
from engine.schedulers.base import SLOTS, SOURCES, StepPlan

OUTPUTS = ("next", *SLOTS)  # what the weights make, in order
GRAPH_FILE = Path(__file__).with_name("step_graph.onnx")  # built by export/graphs/step.py


def plan_weights(plan: StepPlan) -> np.ndarray:
    """(len(OUTPUTS), len(SOURCES)) float64: the plan's outputs as weights of the sources; an empty slot is zeros."""
    flat = plan.flat()
    weights = np.zeros((len(OUTPUTS), len(SOURCES)), np.float64)
    for o, name in enumerate(OUTPUTS):
        for s, source in enumerate(SOURCES):
            weights[o, s] = flat.get(name, {}).get(source, 0.0)
    return weights


@dataclass
class _Group:
    """One size bin's rows on the device: its members (in row order), their latents and sampler state in two
    buffers each (one read, one written per step), the step graph's inputs that stay the same while the members do,
    and the transformer slot whose latents its step graph writes."""

    members: tuple[Generation, ...]
    x: list[ort.OrtValue]
    state: list[ort.OrtValue]
    fixed: dict[str, ort.OrtValue] = field(default_factory=dict)
    current: int = 0
    slot: Slot | None = None


class DeviceSteps:
    """The steps of a bound transformer kept on its device: the transformer's output goes to the step graph, the
    step graph's next latents into the transformer's input buffer, and latents and sampler state stay there from
    step to step. The host keeps a request's latents and sampler state (Generation.latents, sampler.state) only at
    the edges: they go up when a group's membership changes (a request joins, leaves or is dropped) and come down
    for the requests that leave, which is when the batch is rebuilt anyway."""

    def __init__(self, bound: BoundSession, acceleration: Acceleration | None = None):
        self.bound = bound
        # where the bound buffers are; not TensorRT: it has no float64, and this graph is a few element-wise nodes
        where = [CUDA, CPU] if bound.device == "cuda" else [CPU]
        self.session = create_session(GRAPH_FILE, where, graph="step", acceleration=acceleration)
        self.groups: dict[tuple[int, int], _Group] = {}

    def step(self, generations: Sequence[Generation], timesteps: np.ndarray, context: np.ndarray,
             mask: np.ndarray, pos_embed: np.ndarray, out_channels: int) -> None:
        """One step of every generation (one size bin); `context`/`mask` may be padded past the real rows."""
        group = self._group(generations)
        rows, first = len(context), generations[0].latents
        shapes = {"latents": ((rows, *first.shape[1:]), np.float32), "timestep": ((rows,), np.float32),
                  "encoder_hidden_states": (context.shape, context.dtype), "encoder_attention_mask": (mask.shape,
                                                                                                    mask.dtype),
                  "pos_embed": (pos_embed.shape, pos_embed.dtype)}
        slot = self.bound.slot(shapes, (rows, out_channels, *first.shape[2:]))
        if not group.fixed:
            group.fixed = self._fixed_inputs(group.members, rows)
        if group.slot is not slot:  # a new group, or its slot was evicted since: its current latents go up
            latents = self._download(group.x[group.current])[self._input_rows(group.members, rows)]
            self.bound.upload(slot, {"latents": latents})
            group.slot = slot
        self.bound.upload(slot, {"timestep": pad_rows(timesteps, rows), "encoder_hidden_states": context,
                                 "encoder_attention_mask": mask, "pos_embed": pos_embed})
        self.bound.execute(slot)
        self._update(group, slot)
        slot.uploaded.pop("latents", None)  # written on the device: the next host upload must not be skipped
        now = time.perf_counter()
        finished = []
        for row, g in self._rows(generations):
            g.step_index += 1
            g.steps_computed += g.rows
            if g.done:
                finished.append((row, g))
                g.timings["denoising"] = now - g.denoise_started
        if finished:
            latents = self._download(group.x[group.current])
            for row, g in finished:
                g.latents = latents[row:row + len(g.latents)].copy()
        if all(g.done for g in generations):
            self.groups.pop(generations[0].size_bin, None)  # its device buffers go

    def _update(self, group: _Group, slot: Slot) -> None:
        """The step graph, on the slot's output and the group's buffers; its next latents into the slot's input."""
        weights, noise = [], []
        for g in group.members:
            weights += [plan_weights(g.sampler.plan())] * len(g.latents)
            if "noise" not in group.fixed:  # drawn here, in each request's own stream, as the numpy step does
                noise.append(g.rng.standard_normal(g.latents.shape, dtype=np.float32) if g.sampler.needs_noise
                             else np.zeros(g.latents.shape, np.float32))
        binding = self.session.io_binding()
        for name, value in (("noise_pred", slot.output), ("x", group.x[group.current]),
                            ("state", group.state[group.current]), *group.fixed.items()):
            binding.bind_ortvalue_input(name, value)
        binding.bind_cpu_input("weights", np.stack(weights))
        if noise:
            binding.bind_cpu_input("noise", np.concatenate(noise))
        following = 1 - group.current
        binding.bind_ortvalue_output("next", group.x[following])
        binding.bind_ortvalue_output("next_state", group.state[following])
        binding.bind_ortvalue_output("next_input", slot.inputs["latents"])
        self.session.run_with_iobinding(binding)
        group.current = following

    def _fixed_inputs(self, members: Sequence[Generation], rows: int) -> dict[str, ort.OrtValue]:
        """The step graph's inputs that change only with the members, on the device: which transformer rows are
        each image's conditional and unconditional halves, its guidance, and the rows of the next transformer
        input; the noise too (zeros) when no member's sampler draws any."""
        images = sum(len(g.latents) for g in members)
        cond, uncond, guidance, guided = [], [], [], []
        negative = images
        for row, g in self._rows(members):
            n = len(g.latents)
            cond += range(row, row + n)
            uncond += range(negative, negative + n) if g.guided else range(row, row + n)
            negative += n if g.guided else 0
            guidance += [g.request.guidance_scale] * n
            guided += [g.guided] * n
        arrays = {"cond_rows": np.array(cond), "uncond_rows": np.array(uncond),
                  "guidance": np.array(guidance, np.float32), "guided": np.array(guided),
                  "input_rows": self._input_rows(members, rows)}
        if not any(g.sampler.needs_noise for g in members):
            latents = members[0].latents
            arrays["noise"] = np.zeros((images, *latents.shape[1:]), np.float32)
        device, device_id = self.bound.device, self.bound.device_id
        return {name: ort.OrtValue.ortvalue_from_numpy(a, device, device_id) for name, a in arrays.items()}

    def _input_rows(self, members: Sequence[Generation], rows: int) -> np.ndarray:
        """The image rows that make the transformer's `rows` input rows: every image, then the guided ones again
        (their unconditional half), then row 0 for the rows padded for a captured graph (read, never used)."""
        images, guided = [], []
        for row, g in self._rows(members):
            images += range(row, row + len(g.latents))
            guided += range(row, row + len(g.latents)) if g.guided else []
        return np.array(images + guided + [0] * (rows - len(images) - len(guided)))

    def _group(self, generations: Sequence[Generation]) -> _Group:
        """The bin's group for these members: the one on the device when they are its members, else a new one
        (the old one's members that go on first take their latents and state back to the host)."""
        key = generations[0].size_bin
        group = self.groups.get(key)
        if group is not None and len(group.members) == len(generations) and all(
                a is b for a, b in zip(group.members, generations, strict=True)):
            return group
        if group is not None:
            self._to_host(group)
        latents = np.concatenate([g.latents for g in generations])
        state = np.zeros((len(SLOTS), *latents.shape), np.float64)
        for row, g in self._rows(generations):
            for s, slot in enumerate(SLOTS):
                if slot in g.sampler.state:
                    state[s, row:row + len(g.latents)] = g.sampler.state[slot]
        device, device_id = self.bound.device, self.bound.device_id
        group = self.groups[key] = _Group(
            tuple(generations),
            x=[ort.OrtValue.ortvalue_from_numpy(latents, device, device_id),
               ort.OrtValue.ortvalue_from_shape_and_type(latents.shape, np.float32, device, device_id)],
            state=[ort.OrtValue.ortvalue_from_numpy(state, device, device_id),
                   ort.OrtValue.ortvalue_from_shape_and_type(state.shape, np.float64, device, device_id)])
        return group

    def release(self, size_bin: tuple[int, int]) -> None:
        """The bin's rows step on the host next (engine.step_cache): their latents and state come back, the
        group's device buffers go."""
        group = self.groups.pop(size_bin, None)
        if group is not None:
            self._to_host(group)

    def _to_host(self, group: _Group) -> None:
        """Each unfinished member's latents and sampler state, from the device back into its Generation."""
        latents = self._download(group.x[group.current])
        state = self._download(group.state[group.current])
        for row, g in self._rows(group.members):
            if g.done:
                continue
            rows = slice(row, row + len(g.latents))
            g.latents = latents[rows].copy()
            g.sampler.state = {slot: state[s, rows].copy() for s, slot in enumerate(SLOTS)}

    @staticmethod
    def _download(value: ort.OrtValue) -> np.ndarray:
        return np.array(value.numpy())  # a copy: on the CPU numpy() is a view of a buffer that is written again

    @staticmethod
    def _rows(generations: Sequence[Generation]) -> list[tuple[int, Generation]]:
        """(first image row, generation) in row order."""
        out, row = [], 0
        for g in generations:
            out.append((row, g))
            row += len(g.latents)
        return out

    def close(self) -> None:
        self.groups.clear()


def device_steps_for(bound: BoundSession | None, device_step: bool | None, guidance_in_one_batch: bool,
                     acceleration: Acceleration | None = None) -> DeviceSteps | None:
    """The step graph beside a bound transformer: by default where it runs on a GPU (guidance in one call)."""
    wanted = (bound is not None and bound.device != "cpu" and guidance_in_one_batch) if device_step is None \
        else device_step
    if wanted and (bound is None or not guidance_in_one_batch):
        raise ValueError("device_step needs IO binding and guidance in one batch")
    return DeviceSteps(bound, acceleration) if wanted else None
