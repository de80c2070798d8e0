"""`pixart bench`: eager diffusers against the ONNX engine, on the same weights, prompts and initial latents.

One run measures both sides side by side, so the ratios it prints come from one machine in one state. Each side
(eager, and every engine variant) runs in its own subprocess, one after the other, one subprocess per image size:
peak RSS is then that side's alone, and the two never compete for the cores.

What is measured, per side and size: the stages (text encoding of prompt + negative, one guided transformer step at
batch 2B, VAE decode), end to end at --steps, throughput at each --batches (B prompts, one call), cold start (model
load to first image) and peak memory. The images of both sides are compared (PSNR), so a speedup never hides a
wrong picture.

Sizes are the size the transformer runs at: each side is benchmarked on a checkpoint laid out for it (sample_size =
side/8 and the matching bin table, see benchmarks/models.py), so neither side bins to another size or resizes.
Captions are not cleaned on either side (clean_caption=False): the prompts are plain text, and diffusers' cleaning
needs optional packages that the engine does not.

This module is the command and the parent (plan, launch the workers, compare); the flags are in bench_options, a
worker in bench_worker (the sides it measures in bench_sides), the report's files in bench_report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_options import EAGER, add_arguments, command_line, parse_ints, parse_variants, select
from benchmarks.bench_report import write_outputs
from benchmarks.bench_worker import PROGRESS, run_worker
from benchmarks.common.images import psnr
from benchmarks.common.machine import machine_info, versions
from benchmarks.common.paths import ROOT
from benchmarks.common.prompts import NEGATIVE, PROMPTS

LATENT_SEED = 99


def register(subparsers: Any) -> None:
    """Add `bench` to the main CLI's subparsers (sets `func`)."""
    from benchmarks.memory import add_arguments as memory_arguments

    p = subparsers.add_parser("bench", help="benchmark the engine against eager diffusers on the same weights")
    add_arguments(p)
    memory_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # internal: one side at one size, in a fresh process (see _launch)
        return run_worker(Path(argv[1]))
    parser = argparse.ArgumentParser(prog="pixart bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    from benchmarks.memory import add_arguments as memory_arguments

    memory_arguments(parser)
    return run(parser.parse_args(argv))


# ---- the parent: plan, launch the workers, compare, report ------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if getattr(args, "memory", False):
        from benchmarks.memory import run as run_memory

        return run_memory(args)

    from benchmarks.models import cached_export

    sizes, batches = parse_ints(args.sizes), parse_ints(args.batches)
    variants = parse_variants(args.variants)
    device = resolve_device(args.device)
    skipped = {name: why for name, options in variants.items() if (why := unavailable(options, device))}
    variants = {name: options for name, options in variants.items() if name not in skipped}
    for name, why in skipped.items():
        print(f"[bench] skipping {name}: {why}", file=sys.stderr, flush=True)
    sides, measures = select(args.only, variants)
    if 1 not in batches:
        batches = [1, *batches]  # batch 1 is the end-to-end latency and the cold start
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)

    models: dict[int, dict] = {}
    for side in sizes:
        # Building and exporting is not timed against anything: it is cached, and reported from the manifest.
        print(f"[bench] model {args.config} at {side}²: build/export if not cached", file=sys.stderr, flush=True)
        checkpoint, export, info = cached_export(
            args.config, side, progress=not args.no_progress, export_options=json.loads(args.export_options),
            rebuild=args.rebuild,
        )
        models[side] = info

    work = Path(tempfile.mkdtemp(prefix="pixart-bench-"))
    runs: list[dict] = []
    failed: dict[str, str] = {}
    try:
        specs = []
        for side in sizes:
            h = w = side // 8
            latents = np.random.default_rng(LATENT_SEED).standard_normal((max(batches), 4, h, w), dtype=np.float32)
            np.save(work / f"latents-{side}.npy", latents)
            for name in sides:
                specs.append({
                    "side": name, "size": side, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                    "batches": batches, "measures": measures, "guidance": args.guidance, "threads": args.threads,
                    "device": device,
                    "checkpoint": models[side]["checkpoint"], "export": models[side]["export"],
                    "engine_options": variants.get(name, {}), "latents": str(work / f"latents-{side}.npy"),
                    "images": str(work / f"images-{name}-{side}"), "result": str(work / f"result-{name}-{side}.json"),
                })
        bar = tqdm(total=sum(planned_units(s) for s in specs), desc="bench", unit="run", disable=args.no_progress)
        for spec in specs:
            bar.set_postfix_str(f"{spec['side']} {spec['size']}²")
            try:
                runs.append(_launch(spec, work, bar.update))
            except WorkerFailed as exc:  # one variant's failure is reported with the others' figures
                failed[f"{spec['side']} at {spec['size']}²"] = str(exc)
                print(f"[bench] {exc}", file=sys.stderr, flush=True)
        bar.close()
        comparisons = compare(runs, sides)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "command": command_line(args),
        "settings": {
            "config": args.config, "sizes": sizes, "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup, "batches": batches, "guidance": args.guidance, "eager_threads": args.threads,
            "measures": measures, "sides": sides, "variants": {k: v for k, v in variants.items() if k in sides},
            "prompts": list(PROMPTS), "negative_prompt": NEGATIVE, "latent_seed": LATENT_SEED,
            "binning": "checkpoint per size (sample_size = side/8), so both sides run the transformer at side²",
        },
        "machine": machine_info(),
        "versions": versions(),
        "models": {str(k): v for k, v in models.items()},
        "device": device,
        "skipped": skipped,
        "failed": failed,
        "runs": runs,
        "comparisons": comparisons,
    }
    stem = f"bench-{args.config}" + (f"-{args.tag}" if args.tag else "")
    paths = write_outputs(report, out_dir, stem)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if failed else 0


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def unavailable(options: dict, device: str) -> str | None:
    """Why an engine variant cannot run here (a GPU provider on the CPU, or one this build lacks), or None."""
    from engine.runtime import default_providers

    wanted = options.get("providers") or []
    needs_gpu = any(p in GPU_PROVIDERS for p in wanted) or options.get("acceleration", {}).get("cuda_graphs")
    if needs_gpu and device != "cuda":
        return f"needs a GPU provider ({', '.join(wanted) or 'CUDA graphs'}); this run is on the {device}"
    missing = [p for p in wanted if p not in default_providers()]
    if missing:
        return f"{', '.join(missing)} not available in this onnxruntime build on this machine"
    return None


def planned_units(spec: dict) -> int:
    """Progress units a worker reports: one for the cold start, one per timed or warm-up call."""
    per = spec["warmup"] + spec["repeats"]
    m = spec["measures"]
    units = 1
    units += per * (("text" in m) + ("decode" in m) + ("e2e" in m))
    units += per * len(spec["batches"]) * ("step" in m)
    units += per * len([b for b in spec["batches"] if b != 1]) * ("throughput" in m)
    return units


class WorkerFailed(RuntimeError):
    """A side's worker process failed: its log's tail is the message."""


def _launch(spec: dict, work: Path, advance: Callable[[int], Any]) -> dict:
    """Run one worker to completion, forwarding its progress; its stderr goes to a log shown when it fails."""
    spec_path = work / f"spec-{spec['side']}-{spec['size']}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"log-{spec['side']}-{spec['size']}.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench", "--worker", str(spec_path)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                advance(int(line.split()[1]))
            else:
                log.write(line)
        rc = proc.wait()
    if rc != 0 or not Path(spec["result"]).exists():
        tail = log_path.read_text()[-4000:]
        raise WorkerFailed(f"bench worker {spec['side']} at {spec['size']}² failed (exit {rc}):\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["images_dir"] = spec["images"]
    return result


def compare(runs: list[dict], sides: list[str]) -> list[dict]:
    """PSNR and max difference of every engine variant's images against eager's, per size and batch."""
    by = {(r["side"], r["size"]): r for r in runs}
    out = []
    for (name, size), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ref = by.get((EAGER, size))
        if name == EAGER or ref is None:
            continue
        for file in sorted(Path(r["images_dir"]).glob("*.npy")):
            other = Path(ref["images_dir"]) / file.name
            if not other.exists():
                continue
            ours, theirs = np.load(file), np.load(other)
            entry = {"size": size, "variant": name, "batch": int(file.stem.split("b")[-1])}
            if ours.shape != theirs.shape:
                entry["error"] = f"shapes differ: {ours.shape} vs {theirs.shape}"
            else:
                entry["psnr_db"] = psnr(ours, theirs)
                entry["max_abs_diff"] = int(np.abs(ours.astype(int) - theirs.astype(int)).max())
            out.append(entry)
    return out


if __name__ == "__main__":
    sys.exit(main())
