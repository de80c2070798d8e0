"""`pixart bench --memory`: peak memory per stage of one guided image, for engine memory plans and eager diffusers.

Memory stands in for GPU memory here (on a Jetson the two are the same memory). Each side runs in its own process,
one after the other, so a peak is that side's alone. Per stage (load, text encoding, denoising, decoding) the
process's peak resident set is reset (`/proc/self/clear_refs`) before the stage and read after it (VmHWM), so each
figure is that stage's own peak, with what stays resident from earlier stages included; "request" is the largest
of the three request stages, "whole" the process's peak over everything.

Eager diffusers runs with its own memory savers where they apply on this device: fp32 (CPU) or fp16 (CUDA), the
VAE tiled at the same tile size, sequential CPU offload on CUDA. It needs the checkpoint's T5 weights, so it is
skipped (and said so) for the `full` benchmark model, whose T5-XXL is drawn from a seed at export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import bench_options
from benchmarks.common.machine import machine_info, versions
from benchmarks.common.paths import ROOT
from benchmarks.common.prompts import NEGATIVE, PROMPTS
from benchmarks.common.report import write_report

DEFAULT_SIDES = "default,fp16,edge,edge-int4,eager,eager-tiled"
EXPORT_OPTIONS = {"optimize": False, "precisions": ["fp16"], "quantize_text_encoder": ["int4", "int8"],
                  "text_encoder_precision": "fp16"}
MIB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-sides", dest="sides", default=DEFAULT_SIDES,
                   help="engine plans (default, fp16, edge, edge-int4; see engine.memory) and eager sides "
                        "(eager, eager-tiled)")


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set to the current one
        f.write("5")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class Stages:
    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn):
        _peak_reset()
        started = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.peaks[name] = round(_status("VmHWM") / MIB, 1)
        return out


def _engine_side(spec: dict) -> dict:
    from engine import Engine, GenerationRequest
    from engine.manifest import Manifest
    from engine.memory import make_plan
    from engine.runtime import provider_device

    plan = make_plan(Manifest.load(spec["export"]), spec["side"], provider_device())
    stages = Stages()
    with tempfile.TemporaryDirectory() as cache:
        engine = stages.run("load", lambda: Engine.load(spec["export"], **plan.engine_options(cache)))
        request = GenerationRequest(prompt=PROMPTS[0], negative_prompt=NEGATIVE,
                                    image_size=(spec["size"], spec["size"]), num_inference_steps=spec["steps"], seed=1,
                                    clean_caption=False)
        g = stages.run("text_encoding", lambda: engine.prepare(request))

        def denoise():
            while not g.done:
                engine.step([g])

        stages.run("denoising", denoise)
        stages.run("decoding", lambda: engine.finish([g]))
        after = round(_status("VmRSS") / MIB, 1)
    return {"plan": plan.describe(), "estimated_gib": {k: round(v / 2**30, 2) for k, v in plan.stages.items()},
            "peaks_mib": stages.peaks, "seconds": stages.seconds, "resident_after_request_mib": after}


def _eager_side(spec: dict) -> dict:
    import torch
    from diffusers import PixArtSigmaPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    stages = Stages()
    pipe = stages.run("load", lambda: PixArtSigmaPipeline.from_pretrained(spec["checkpoint"], torch_dtype=dtype))
    if cuda:
        pipe.enable_sequential_cpu_offload()
    if spec["side"] == "eager-tiled":
        # diffusers' default tile is the config's sample size (1024 for the SDXL VAE): set it, or nothing tiles
        from engine.memory import VAE_TILE

        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = VAE_TILE
        pipe.vae.tile_latent_min_size = VAE_TILE // pipe.vae_scale_factor
    size, steps = spec["size"], spec["steps"]
    with torch.no_grad():
        embeds = stages.run("text_encoding", lambda: pipe.encode_prompt(
            PROMPTS[0], negative_prompt=NEGATIVE, do_classifier_free_guidance=True, clean_caption=False))
        p, pm, n, nm = embeds
        latents = stages.run("denoising", lambda: pipe(
            prompt_embeds=p, prompt_attention_mask=pm, negative_prompt=None, negative_prompt_embeds=n,
            negative_prompt_attention_mask=nm,
            height=size, width=size, num_inference_steps=steps, guidance_scale=4.5, output_type="latent",
            generator=torch.Generator().manual_seed(1), use_resolution_binning=False).images)
        stages.run("decoding", lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor,
                                                       return_dict=False)[0])
    return {"plan": f"diffusers {str(dtype).removeprefix('torch.')}"
            + (", sequential CPU offload" if cuda else "")
            + (f", VAE in {VAE_TILE}px tiles" if spec["side"] == "eager-tiled" else ""),
            "peaks_mib": stages.peaks, "seconds": stages.seconds}


def _worker(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    result = _eager_side(spec) if spec["side"].startswith("eager") else _engine_side(spec)
    result["peaks_mib"]["request"] = max(result["peaks_mib"][s] for s in ("text_encoding", "denoising", "decoding"))
    result["peaks_mib"]["whole"] = max(result["peaks_mib"].values())
    spec_path.with_suffix(".out.json").write_text(json.dumps(result))
    return 0


def measure(spec: dict) -> dict:
    """Run one side in a fresh process and return its figures (or why it was skipped)."""
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "spec.json"
        path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--worker", str(path)], cwd=ROOT,
                              capture_output=True, text=True)
        out = path.with_suffix(".out.json")
        if done.returncode != 0 or not out.exists():
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        return json.loads(out.read_text())


def _exceeds_machine(export: Path, side: str) -> str | None:
    """Why an engine side is not run here (its estimated peak passes 90% of this machine's memory), or None:
    running it would only measure the out-of-memory killer."""
    if side.startswith("eager"):
        return None
    from engine.manifest import Manifest
    from engine.memory import make_plan
    from engine.runtime import provider_device

    plan = make_plan(Manifest.load(export), side, provider_device())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if plan.peak > 0.9 * total:
        return (f"estimated peak {plan.peak / 2**30:.1f} GiB ({plan.describe()}) passes this machine's "
                f"{total / 2**30:.0f} GiB: not run")
    return None


def run(args: argparse.Namespace) -> int:
    from benchmarks.models import cached_export

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    report = {"command": bench_options.command_line(args), "machine": machine_info(), "versions": versions(),
              "config": args.config, "steps": args.steps, "results": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        checkpoint, export, info = cached_export(args.config, size, progress=not args.no_progress,
                                                 export_options=EXPORT_OPTIONS)
        report.setdefault("exports", {})[size] = info
        rows = report["results"][size] = {}
        for side in sides:
            if side.startswith("eager") and args.config == "full":
                rows[side] = {"skipped": "the full model's T5-XXL is drawn from a seed at export: diffusers has no "
                                         "weights to load"}
                continue
            too_big = _exceeds_machine(export, side)
            if too_big:
                rows[side] = {"skipped": too_big}
                continue
            spec = {"side": side, "size": size, "steps": args.steps, "export": str(export),
                    "checkpoint": str(checkpoint)}
            rows[side] = measure(spec)
            print(f"{size}² {side}: {json.dumps(rows[side].get('peaks_mib') or rows[side])}", flush=True)
    write_report(Path(args.out_dir), f"memory-{args.tag or args.config}", report, markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"Peak resident memory per stage, one guided image, {report['steps']} steps, config "
             f"`{report['config']}` (GiB; `{report['command']}`)", ""]
    cols = ("load", "text_encoding", "denoising", "decoding", "request", "whole")
    lines += ["| size | side | " + " | ".join(cols) + " | load s | what |", "|---" * (len(cols) + 4) + "|"]
    for size, rows in report["results"].items():
        for side, r in rows.items():
            if "peaks_mib" not in r:
                lines.append(f"| {size}² | {side} | " + " | ".join("—" for _ in cols)
                             + f" | — | {r.get('skipped') or r.get('error')} |")
                continue
            cells = [f"{r['peaks_mib'][c] / 1024:.2f}" for c in cols]
            lines.append(f"| {size}² | {side} | " + " | ".join(cells) + f" | {r['seconds']['load']} | {r['plan']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(Path(argv[1]))
    parser = argparse.ArgumentParser(prog="pixart bench --memory", description=__doc__.split("\n\n")[0])
    bench_options.add_arguments(parser)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
