"""The GPU path's first contact: one command that fits a lease (about 6 minutes on an H100 after the wheel is in)
and answers whether the engine really runs on the GPU, how fast a step is, and at what precision.

    python -m benchmarks.gpu_first_run --device cuda --out DIR   # on the GPU machine (benchmarks/gpu_first_run.sh)
    python -m benchmarks.gpu_first_run --device cpu --out DIR    # the same program proven here, smaller

What it does, with random weights at PixArt-Σ's real dimensions (timing does not depend on the values), skipping
T5-XXL (exporting it takes half an hour; the text context is random, 4096 wide):

1. where it runs: ONNX Runtime's providers, the libraries a GPU provider lacks, the GPU; and, per session, the
   provider each node was placed on and how many host-device copies (Memcpy nodes) the graph needs;
2. exports the XL/2 transformer (fp32, and fp16 with fused attention, as `pixart export --precision fp16`) and
   the SDXL VAE decoder;
3. step medians through the engine's IO binding for rows {2, 4, 8, 16} at 1024² and rows 2 at 512² (if 512² is not
   about a quarter of 1024², the step is dispatch-bound), fp32 and fp16, fp16 with and without CUDA graphs, against
   torch fp16 eager on the same weights;
4. the host's share of a step: guidance and the sampler update in numpy (both samplers), against the same update
   in the engine's step graph on the device (engine/step_graph.py);
5. fp16 against fp32 on the same inputs (error, NaN or Inf);
6. the VAE's 1024² decode: time and device memory.

On the CPU (`--device cpu`) the model has one layer, the sizes are 256² and 128², eager runs in fp32, and what needs
CUDA (CUDA graphs, eager fp16, device memory) is skipped, saying so. JSON and Markdown go to --out; the table is
printed last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.device import DeviceMemory, environment, open_session, placement
from benchmarks.common.machine import machine_info, versions
from benchmarks.common.report import write_report
from benchmarks.models import FULL_TRANSFORMER, SDXL_VAE

TEXT_TOKENS = 32  # a typical prompt: the engine trims text to its 32-token bucket


@dataclass(frozen=True)
class Plan:
    layers: int
    sizes: tuple[int, ...]
    rows: dict[int, tuple[int, ...]]
    vae_side: int
    warmup: int
    repeats: int


PLANS = {
    "cuda": Plan(layers=28, sizes=(1024, 512), rows={1024: (2, 4, 8, 16), 512: (2,)}, vae_side=1024, warmup=3,
                 repeats=10),
    "cpu": Plan(layers=1, sizes=(256, 128), rows={256: (2, 4), 128: (2,)}, vae_side=256, warmup=1, repeats=2),
}


@dataclass
class Report:
    device: str
    plan: dict
    environment: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    host: list = field(default_factory=list)
    precision: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)


# -- 1. where it runs: benchmarks.common.device (providers, the libraries they lack, node placement) ------------

# -- 2. the models and their graphs --------------------------------------------------------------------------------
def build(plan: Plan, seed: int = 0):
    """The XL/2 transformer (with plan.layers layers) and the SDXL VAE, random, seeded, in fp32 on the host."""
    import torch
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    torch.manual_seed(seed)
    side = max(plan.sizes)
    config = {**FULL_TRANSFORMER, "num_layers": plan.layers, "sample_size": side // 8,
              "interpolation_scale": side / 512}
    transformer = PixArtTransformer2DModel(**config).eval()
    vae = AutoencoderKL(**SDXL_VAE).eval()
    return transformer, vae


def export(transformer, vae, folder: Path) -> dict[str, Any]:
    from export.graphs.transformer import export_transformer
    from export.graphs.vae import export_vae_decoder
    from export.onnx_export import export_half_transformer

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for name, make in (("fp32", lambda p: export_transformer(transformer, p)),
                       ("fp16", lambda p: export_half_transformer(transformer, p, "fp16")),
                       ("vae", lambda p: export_vae_decoder(vae, p))):
        t0 = time.perf_counter()
        path = make(folder / f"{name}.onnx")
        out[name] = {"path": str(path), "seconds": round(time.perf_counter() - t0, 1)}
    return out


# -- 3. steps ------------------------------------------------------------------------------------------------------
def step_inputs(transformer, rows: int, side: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from engine.positions import sincos_pos_embed
    from export.graphs.transformer import pos_embed_geometry

    cfg, h = transformer.config, side // 8
    return {
        "latents": rng.standard_normal((rows, cfg.in_channels, h, h), dtype=np.float32),
        "timestep": np.full(rows, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, TEXT_TOKENS, cfg.caption_channels), dtype=np.float32),
        "encoder_attention_mask": np.ones((rows, TEXT_TOKENS), np.int64),
        "pos_embed": sincos_pos_embed(transformer.inner_dim, h // cfg.patch_size, h // cfg.patch_size,
                                      *pos_embed_geometry(transformer)),
    }


def median_ms(run, plan: Plan) -> dict[str, float]:
    for _ in range(plan.warmup):
        run()
    times = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2), "n": len(times)}


def time_engine(session, feeds: dict[str, np.ndarray], out_channels: int, device: str, plan: Plan,
                cuda_graphs: bool = False) -> dict[str, float]:
    """One step as the engine runs it: inputs in bound buffers (the text once), the prediction copied back."""
    from engine.binding import BoundSession

    bound = BoundSession(session, device, cuda_graphs=cuda_graphs)
    shape = (len(feeds["latents"]), out_channels, *feeds["latents"].shape[2:])
    fresh = dict(feeds)

    def run() -> None:  # new latents every step, as the loop makes them; the rest is the same arrays
        fresh["latents"] = feeds["latents"].copy()
        bound.run(fresh, shape)

    return median_ms(run, plan)


def eager_model(transformer, device: str, dtype_name: str):
    """The same weights as torch runs them: fp16 on the GPU (what serving compares against), fp32 on the CPU."""
    import copy

    import torch

    from export.graphs.transformer import TransformerGraph

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    return TransformerGraph(copy.deepcopy(transformer).to(device=device, dtype=dtype)).eval()


def time_eager(graph, feeds: dict[str, np.ndarray], device: str, plan: Plan) -> dict[str, float]:
    import torch

    inputs = {k: torch.from_numpy(v.copy()).to(device) for k, v in feeds.items()}

    def run() -> None:
        with torch.no_grad():
            graph(**inputs)
        if device == "cuda":
            torch.cuda.synchronize()

    return median_ms(run, plan)


# -- 4. the host's share of a step ---------------------------------------------------------------------------------
def host_step_ms(rows: int, side: int, plan: Plan) -> dict[str, float]:
    """Guidance and the sampler update of `rows` transformer rows (rows/2 guided images) at `side`², in numpy."""
    from engine.schedulers import make_scheduler

    rng = np.random.default_rng(1)
    images, h = max(1, rows // 2), side // 8
    pred = rng.standard_normal((2 * images, 8, h, h), dtype=np.float32)
    latents = rng.standard_normal((images, 4, h, h), dtype=np.float32)
    out = {}
    for name in ("DPM-SOLVER", "SA-SOLVER"):
        sampler = make_scheduler(name, {})  # diffusers' defaults: PixArt-Σ's schedule
        sampler.set_timesteps(plan.warmup + plan.repeats + 2)

        def update(sampler=sampler) -> None:
            cond, uncond = pred[:images], pred[images:]
            eps = (uncond + np.float32(4.5) * (cond - uncond))[:, :4]
            noise = rng.standard_normal(latents.shape, dtype=np.float32) if sampler.needs_noise else None
            sampler.step(eps, latents, noise)

        out[name] = median_ms(update, plan)["median_ms"]
    return out


def device_step_ms(rows: int, side: int, device: str, plan: Plan) -> float:
    """The same update as the engine's step graph runs it where the transformer runs (engine.step_graph), its big
    inputs already there: what replaces the host update and the copies."""
    import onnxruntime as ort

    from engine.schedulers import make_scheduler
    from engine.schedulers.base import SLOTS
    from engine.step_graph import GRAPH_FILE, plan_weights

    images, h = max(1, rows // 2), side // 8
    session = open_session(GRAPH_FILE, device)
    where = "cuda" if device == "cuda" else "cpu"
    rng = np.random.default_rng(3)
    sampler = make_scheduler("SA-SOLVER", {})
    sampler.set_timesteps(plan.warmup + plan.repeats + 2)
    device_values = {
        "noise_pred": rng.standard_normal((2 * images, 8, h, h), dtype=np.float32),
        "x": rng.standard_normal((images, 4, h, h), dtype=np.float32),
        "state": np.zeros((len(SLOTS), images, 4, h, h)),
    }
    binding = session.io_binding()
    for name, array in device_values.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, where))
    for name, shape, dtype in (("next", (images, 4, h, h), np.float32), ("next_state", (len(SLOTS), images, 4, h, h),
                                                                           np.float64),
                               ("next_input", (2 * images, 4, h, h), np.float32)):
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, where))

    def update() -> None:
        weights = np.stack([plan_weights(sampler.plan())] * images)
        for name, array in (("cond_rows", np.arange(images)), ("uncond_rows", np.arange(images, 2 * images)),
                            ("guidance", np.full(images, 4.5, np.float32)), ("guided", np.ones(images, bool)),
                            ("noise", rng.standard_normal((images, 4, h, h), dtype=np.float32)),
                            ("weights", weights), ("input_rows", np.concatenate([np.arange(images)] * 2))):
            binding.bind_cpu_input(name, array)
        session.run_with_iobinding(binding)

    return median_ms(update, plan)["median_ms"]


# -- 5. precision ---------------------------------------------------------------------------------------------------
def compare(fp32_session, fp16_session, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    a = fp32_session.run(None, feeds)[0].astype(np.float64)
    b = fp16_session.run(None, feeds)[0].astype(np.float64)
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
    return {"max_abs_diff": float(np.abs(a - b).max()), "relative_l2": rel, "finite": finite,
            "cosine": float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))}


# -- 6. the VAE ----------------------------------------------------------------------------------------------------
def time_vae(session, side: int, device: str, plan: Plan) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((1, 4, side // 8, side // 8), dtype=np.float32)
    out: dict[str, Any] = {"side": side}
    if device == "cuda":
        with DeviceMemory() as memory:
            image = session.run(None, {"latents": latents})[0]
        out["peak_device_mib"] = memory.peak_mib
    else:
        image = session.run(None, {"latents": latents})[0]
    out["finite"] = bool(np.isfinite(image).all())
    out.update(median_ms(lambda: session.run(None, {"latents": latents}), plan))
    return out


# -- the run ---------------------------------------------------------------------------------------------------------
def run(device: str, work: Path) -> Report:
    plan = PLANS[device]
    report = Report(device=device, plan=asdict(plan))
    report.environment = environment(device)
    say = lambda message: print(f"[first-run] {message}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"building the transformer ({plan.layers} layers, real widths) and the SDXL VAE")
    transformer, vae = build(plan)
    report.exports = export(transformer, vae, work)
    sessions = {name: open_session(Path(report.exports[name]["path"]), device) for name in ("fp32", "fp16", "vae")}
    report.placement = {name: placement(session) for name, session in sessions.items()}
    graphs = None
    if device == "cuda":
        graphs = open_session(Path(report.exports["fp16"]["path"]), device, cuda_graphs=True)
        report.placement["fp16_cuda_graphs"] = placement(graphs)
    else:
        report.skipped["cuda_graphs"] = "needs the CUDA provider (graph capture)"
        report.skipped["eager_fp16"] = "needs CUDA (fp16 eager on the CPU is not what serving compares against); " \
            "eager runs in fp32 here"
        report.skipped["device_memory"] = "needs CUDA"
    rng = np.random.default_rng(0)
    out_channels = int(transformer.config.out_channels)
    eager_dtype = "fp16" if device == "cuda" else "fp32"
    eager = eager_model(transformer, device, eager_dtype)
    for side in plan.sizes:
        for rows in plan.rows[side]:
            say(f"step {side}² rows {rows}")
            feeds = step_inputs(transformer, rows, side, rng)
            row = {"side": side, "rows": rows,
                   "engine_fp32": time_engine(sessions["fp32"], feeds, out_channels, device, plan),
                   "engine_fp16": time_engine(sessions["fp16"], feeds, out_channels, device, plan)}
            if graphs is not None:
                row["engine_fp16_cuda_graphs"] = time_engine(graphs, feeds, out_channels, device, plan, True)
            row[f"eager_{eager_dtype}"] = time_eager(eager, feeds, device, plan)
            report.steps.append(row)
            host = host_step_ms(rows, side, plan)
            report.host.append({"side": side, "rows": rows, "update_ms": host,
                                "share_of_fp16_step": round(max(host.values()) / row["engine_fp16"]["median_ms"], 3),
                                "device_update_ms": device_step_ms(rows, side, device, plan)})
    side = max(plan.sizes)
    report.precision = compare(sessions["fp32"], sessions["fp16"], step_inputs(transformer, 2, side, rng))
    say(f"VAE decode {plan.vae_side}²")
    report.vae = time_vae(sessions["vae"], plan.vae_side, device, plan)
    return report


def markdown(report: Report) -> str:
    env = report.environment
    lines = [f"# GPU first run ({report.device})", "",
             f"ONNX Runtime {env['onnxruntime']} ({', '.join(env['usable'])} usable)"
             + (f", {env['gpu']}" if env.get("gpu") else ""), ""]
    lines += ["| session | runs on | nodes per provider | host-device copies |", "|---|---|---|---|"]
    for name, p in report.placement.items():
        lines.append(f"| {name} | {p['providers'][0]} | {p['nodes']} | {p['memcpy_nodes']} |")
    columns = [k for k in report.steps[0] if k not in ("side", "rows")] if report.steps else []
    lines += ["", "| step | " + " | ".join(columns) + " | host update (ms) | device update (ms) |",
              "|" + "---|" * (len(columns) + 3)]
    for step, host in zip(report.steps, report.host, strict=True):
        cells = [f"{step[c]['median_ms']:.1f} ms" for c in columns]
        lines.append(f"| {step['side']}² rows {step['rows']} | " + " | ".join(cells)
                     + f" | {max(host['update_ms'].values()):.2f} ({host['share_of_fp16_step']:.0%}) | "
                     f"{host['device_update_ms']:.2f} |")
    p, v = report.precision, report.vae
    lines += ["", f"fp16 vs fp32 (rows 2): max |diff| {p['max_abs_diff']:.3g}, relative L2 {p['relative_l2']:.3g}, "
              f"cosine {p['cosine']:.5f}, finite {p['finite']}",
              f"VAE {v['side']}² decode: {v['median_ms']:.0f} ms"
              + (f", {v['peak_device_mib']:.0f} MiB device memory" if "peak_device_mib" in v else "")
              + f", finite {v['finite']}"]
    if report.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {why}" for k, why in report.skipped.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_first_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=tuple(PLANS), default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and Markdown report")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the exported graphs (gigabytes at real size; default: a temporary one)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype advice on every cast of the random model
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pixart-first-run-") as scratch:
        report = run(args.device, args.work or Path(scratch))
    data = {**asdict(report), "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info(),
            "versions": versions()}
    md = markdown(report)
    write_report(args.out, f"gpu-first-run-{args.device}", data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
