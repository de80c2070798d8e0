"""The device step's graph against the numpy samplers: guidance and every step of DPM-Solver++ and SA-Solver, for
rows of different requests at different steps in one batch, to float32 rounding."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort

from engine.schedulers import make_scheduler
from engine.schedulers.base import SLOTS
from engine.step_graph import GRAPH_FILE, plan_weights

C, H, W = 4, 6, 5


def test_the_graph_steps_mixed_rows_as_the_numpy_samplers_do() -> None:
    session = ort.InferenceSession(str(GRAPH_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    # (sampler, images, guidance, steps already taken when the batch starts): rows at different steps
    requests = [("DPM-SOLVER", 2, 4.5, 0), ("SA-SOLVER", 1, 3.0, 3), ("DPM-SOLVER", 1, 1.0, 5),
                ("SA-SOLVER", 2, 1.0, 0)]
    samplers, xs = [], []
    for name, images, _, taken in requests:
        sampler = make_scheduler(name, {})
        sampler.set_timesteps(12)
        x = rng.standard_normal((images, C, H, W)).astype(np.float32)
        for _ in range(taken):  # a history of its own: rows join the batch at different steps
            eps = rng.standard_normal((images, C, H, W)).astype(np.float32)
            noise = rng.standard_normal((images, C, H, W)).astype(np.float32) if sampler.needs_noise else None
            x = sampler.step(eps, x, noise)
        samplers.append(sampler)
        xs.append(x)
    references = copy.deepcopy(samplers)  # step in numpy from the same state
    rows = sum(n for _, n, _, _ in requests)
    guided = [g > 1.0 for _, _, g, _ in requests]
    uncond_rows = sum(n for (_, n, _, _), gd in zip(requests, guided, strict=True) if gd)
    x = np.concatenate(xs)
    state = np.zeros((len(SLOTS), rows, C, H, W))
    row = 0
    for sampler, (_, n, _, _) in zip(samplers, requests, strict=True):
        for s, slot in enumerate(SLOTS):
            if slot in sampler.state:
                state[s, row:row + n] = sampler.state[slot]
        row += n
    reference_x = list(xs)
    for _ in range(5):
        noise_pred = rng.standard_normal((rows + uncond_rows, 8, H, W)).astype(np.float32)
        noise = np.zeros((rows, C, H, W), np.float32)
        weights, cond, uncond, scale, is_guided = [], [], [], [], []
        row = negative = 0
        for i, (sampler, (_, n, g, _)) in enumerate(zip(samplers, requests, strict=True)):
            weights += [plan_weights(sampler.plan())] * n
            if sampler.needs_noise:
                noise[row:row + n] = rng.standard_normal((n, C, H, W)).astype(np.float32)
            cond += list(range(row, row + n))
            uncond += list(range(rows + negative, rows + negative + n)) if guided[i] else list(range(row, row + n))
            scale += [g] * n
            is_guided += [guided[i]] * n
            # the numpy reference: guidance as the engine mixes it, then the sampler's own step
            eps = noise_pred[row:row + n]
            if guided[i]:
                u = noise_pred[rows + negative: rows + negative + n]
                eps = u + np.float32(g) * (eps - u)
                negative += n
            reference_x[i] = references[i].step(eps[:, :C], reference_x[i],
                                                 noise[row:row + n] if sampler.needs_noise else None)
            row += n
        input_rows = list(range(rows)) + [r for r, gd in enumerate(is_guided) if gd]
        x, state, next_input = session.run(None, {
            "noise_pred": noise_pred, "cond_rows": np.array(cond), "uncond_rows": np.array(uncond),
            "guidance": np.array(scale, np.float32), "guided": np.array(is_guided), "x": x, "noise": noise,
            "state": state, "weights": np.stack(weights), "input_rows": np.array(input_rows)})
        np.testing.assert_allclose(x, np.concatenate(reference_x), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(next_input, x[input_rows])


def test_the_committed_graph_is_what_the_exporter_builds() -> None:
    import pytest

    step = pytest.importorskip("export.graphs.step", reason="needs the onnx package (the export extra)")
    assert GRAPH_FILE.read_bytes() == step.build_step_graph().SerializeToString()
