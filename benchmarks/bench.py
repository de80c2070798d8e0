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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MEASURES = ("text", "step", "decode", "e2e", "throughput")
EAGER = "eager"
PROMPTS = (
    "a small red fox sitting in fresh snow, 35mm photo",
    "an old lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen with steam rising, studio lighting",
    "a robot reading a newspaper in a quiet cafe",
)
NEGATIVE = "blurry, low quality"
LATENT_SEED = 99
PROGRESS = "@@progress"


# ---- command line -----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", choices=("tiny", "small", "full"), help="checkpoint to build and run")
    p.add_argument("--sizes", default="256,512,1024", help="square pixel sides the transformer runs at")
    p.add_argument("--steps", type=int, default=20, help="denoising steps end to end")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    p.add_argument("--batches", default="1,2,4", help="prompts per call for the throughput runs")
    p.add_argument("--guidance", type=float, default=4.5, help="guidance scale (> 1: guided, batch 2B)")
    p.add_argument(
        "--only",
        default="",
        help=f"comma list limiting the run: measures ({', '.join(MEASURES)}) and/or sides ({EAGER} or variant names)",
    )
    p.add_argument(
        "--variants",
        default='{"engine": {}}',
        help='engine variants as JSON {name: {Engine.load keyword: value}} or a path to such a file',
    )
    p.add_argument("--export-options", default="{}", help='export_model keywords as JSON, e.g. {"int8": true}')
    p.add_argument("--rebuild", action="store_true", help="re-export even if a cached export exists")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on the eager side")
    p.add_argument("--out-dir", default=str(RESULTS), help="where the JSON, Markdown and PNG go")
    p.add_argument("--tag", default="", help="suffix for the output file names (default: the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--memory", action="store_true",
                   help="measure peak memory per stage instead (engine memory plans and eager; benchmarks/memory.py)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda: eager diffusers in fp16 on the GPU, the engine on the GPU providers; cpu: both on the "
                   "CPU (fp32 eager); auto: cuda when torch sees a GPU. Variants that need a provider this machine "
                   "lacks are skipped and listed in the report")


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
        return _worker(Path(argv[1]))
    parser = argparse.ArgumentParser(prog="pixart bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    from benchmarks.memory import add_arguments as memory_arguments

    memory_arguments(parser)
    return run(parser.parse_args(argv))


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_variants(text: str) -> dict[str, dict]:
    """Variants from inline JSON or a JSON file: {name: {Engine.load keyword arguments}}."""
    source = Path(text).read_text() if not text.lstrip().startswith("{") and Path(text).exists() else text
    variants = json.loads(source)
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise SystemExit("--variants: expected a JSON object {name: {Engine.load keyword: value}}")
    if EAGER in variants:
        raise SystemExit(f"--variants: {EAGER!r} is the diffusers side's name; pick another")
    return variants


def select(only: str, variants: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(sides, measures) that --only leaves in; an empty list of either kind means all of that kind."""
    items = [x.strip() for x in only.split(",") if x.strip()]
    sides_all = [EAGER, *variants]
    unknown = [x for x in items if x not in MEASURES and x not in sides_all]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; measures are {MEASURES}, sides are {sides_all}")
    sides = [x for x in sides_all if x in items] or sides_all
    measures = [x for x in MEASURES if x in items] or list(MEASURES)
    return sides, measures


# ---- the parent: plan, launch the workers, compare, report ------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if getattr(args, "memory", False):
        from benchmarks.memory import run as run_memory

        return run_memory(args)

    from benchmarks.models import cached_export

    sizes, batches = _ints(args.sizes), _ints(args.batches)
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
            runs.append(_launch(spec, work, bar.update))
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
        "runs": runs,
        "comparisons": comparisons,
    }
    stem = f"bench-{args.config}" + (f"-{args.tag}" if args.tag else "")
    paths = write_outputs(report, out_dir, stem)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (sys.argv is the caller's, e.g. pytest's, when called from code)."""
    parts = [f"pixart bench --config {args.config} --sizes {args.sizes} --steps {args.steps} --repeats {args.repeats}",
             f"--warmup {args.warmup} --batches {args.batches}"]
    if args.only:
        parts.append(f"--only {args.only}")
    if parse_variants(args.variants) != {"engine": {}}:
        parts.append(f"--variants '{args.variants}'")
    return " ".join(parts)


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
        raise RuntimeError(f"bench worker {spec['side']} at {spec['size']}² failed (exit {rc}):\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["images_dir"] = spec["images"]
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


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


# ---- a worker: one side at one size -----------------------------------------------------------------------------


def stats(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    return {
        "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
        "n": len(samples), "samples": [round(float(x), 6) for x in a],
    }


class GpuMemory:
    """Peak GPU memory of this process, polled from nvidia-smi (it sees ONNX Runtime's arena and torch's alike)."""

    def __init__(self, interval: float = 0.2):
        self.peak_mib = 0.0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemory:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=5)
            self._sample()

    def _sample(self) -> None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].replace(".", "").isdigit():
                self.peak_mib = max(self.peak_mib, float(parts[1]))

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()


class Side:
    """What a worker needs from either side: load, the three stages, and a batch end to end (uint8 images)."""

    device = "cpu"
    calls = 0

    def fresh(self, prompt: str) -> str:
        """The prompt made new for each call, the same sequence on both sides: a text-embedding cache (the
        engine has one) must not turn repeats of one prompt into free text encoding. Negatives stay repeated,
        as in real traffic."""
        self.calls += 1
        return f"{prompt}, take {self.calls}"

    def load(self) -> None: ...
    def prepare(self, size: int, batch: int) -> None: ...  # inputs for the stage calls, made untimed
    def text(self) -> None: ...
    def step(self, batch: int) -> None: ...
    def decode(self) -> None: ...
    def generate(self, prompts: list[str], latents: np.ndarray, steps: int) -> np.ndarray: ...
    def info(self) -> dict:
        return {}


class EagerSide(Side):
    def __init__(self, spec: dict):
        import torch

        self.torch, self.spec = torch, spec
        torch.set_num_threads(spec["threads"])
        self.device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 on a GPU, as the eager baseline is deployed; fp32 on a CPU, where half precision is not faster
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def load(self) -> None:
        from diffusers import PixArtSigmaPipeline

        self.pipe = PixArtSigmaPipeline.from_pretrained(self.spec["checkpoint"], torch_dtype=self.dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def prepare(self, size: int, batch: int) -> None:
        torch = self.torch
        with torch.inference_mode():
            embeds, mask, neg, neg_mask = self._encode(PROMPTS[0])
            self.ctx = {
                b: (torch.cat([neg.repeat(b, 1, 1), embeds.repeat(b, 1, 1)]),
                    torch.cat([neg_mask.repeat(b, 1), mask.repeat(b, 1)]))
                for b in self.spec["batches"]
            }
        lat = torch.from_numpy(np.load(self.spec["latents"])).to(self.device, self.dtype)
        self.latents = lat
        self.t = torch.tensor(999.0, device=self.device)

    def _encode(self, prompt: str):
        return self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=True, negative_prompt=NEGATIVE, num_images_per_prompt=1,
            device=self.device, clean_caption=False, max_sequence_length=300,
        )

    def text(self) -> None:
        with self.torch.inference_mode():
            self._encode(self.fresh(PROMPTS[0]))
        self._sync()

    def step(self, batch: int) -> None:
        ctx, mask = self.ctx[batch]
        x = self.torch.cat([self.latents[:batch]] * 2)
        with self.torch.inference_mode():
            self.pipe.transformer(
                x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=self.t.expand(x.shape[0]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
            )
        self._sync()

    def decode(self) -> None:
        vae = self.pipe.vae
        with self.torch.inference_mode():
            vae.decode(self.latents[:1] / vae.config.scaling_factor, return_dict=False)
        self._sync()

    def generate(self, prompts: list[str], latents: np.ndarray, steps: int) -> np.ndarray:
        size = latents.shape[-1] * 8
        with self.torch.inference_mode():
            images = self.pipe(
                prompt=[self.fresh(p) for p in prompts], negative_prompt=[NEGATIVE] * len(prompts),
                height=size, width=size,
                num_inference_steps=steps, guidance_scale=self.spec["guidance"],
                latents=self.torch.from_numpy(latents).to(self.device, self.dtype), output_type="np",
                clean_caption=False,
            ).images
        self._sync()
        return (np.asarray(images) * 255).round().astype(np.uint8)

    def info(self) -> dict:
        out = {"device": self.device, "torch_threads": self.torch.get_num_threads(), "dtype": str(self.dtype)}
        if self.device == "cuda":
            out["gpu_max_allocated_mib"] = self.torch.cuda.max_memory_allocated() / 2**20
        return out


class EngineSide(Side):
    def __init__(self, spec: dict):
        import engine.pipeline  # noqa: F401  (imports are timed apart from the load, as torch's are on the other side)

        self.spec = spec

    def load(self) -> None:
        from engine import Engine
        from engine.runtime import CPU, CUDA, Acceleration

        options = dict(self.spec["engine_options"])
        if "acceleration" in options:
            options["acceleration"] = Acceleration(**options["acceleration"])
        # a variant names its providers only to ask for TensorRT: otherwise CUDA on the GPU, the CPU on the CPU
        providers = options.pop("providers", None) or ([CUDA, CPU] if self.spec.get("device") == "cuda" else [CPU])
        try:
            self.engine = Engine.load(self.spec["export"], providers, **options)
        except TypeError as e:
            opts = self.spec["engine_options"]
            raise SystemExit(f"variant {self.spec['side']}: Engine.load does not take {opts}: {e}") from e

    def prepare(self, size: int, batch: int) -> None:
        from engine import GenerationRequest
        from engine.text import preprocess

        self.texts = [preprocess(PROMPTS[0], False), preprocess(NEGATIVE, False)]
        self.engine.encode_text(self.texts)
        self.latents = np.load(self.spec["latents"])
        # Generations as the server steps them (guided: prompt and negative rows in one call), with room for
        # every timed repeat: a step is timed as the engine runs it, sampler update included.
        self.generations = {
            b: [self.engine.prepare(GenerationRequest(
                prompt=PROMPTS[0], negative_prompt=NEGATIVE, image_size=(size, size), num_inference_steps=100,
                guidance_scale=self.spec["guidance"], seed=i, latents=self.latents[i : i + 1], clean_caption=False,
            )) for i in range(b)]
            for b in self.spec["batches"]
        }

    def text(self) -> None:
        self.engine.encode_text([preprocess_text(self.fresh(PROMPTS[0])), self.texts[1]])

    def step(self, batch: int) -> None:
        self.engine.step(self.generations[batch])

    def decode(self) -> None:
        self.engine.decode(self.latents[:1])

    def generate(self, prompts: list[str], latents: np.ndarray, steps: int) -> np.ndarray:
        from engine import GenerationRequest

        size = latents.shape[-1] * 8
        requests = [
            GenerationRequest(
                prompt=self.fresh(p), negative_prompt=NEGATIVE, image_size=(size, size), num_inference_steps=steps,
                guidance_scale=self.spec["guidance"], seed=i, latents=latents[i : i + 1], clean_caption=False,
            )
            for i, p in enumerate(prompts)
        ]
        results = self.engine.generate_many(requests)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self.last_timings = [r.timings for r in results]
        return np.stack([im.pixels for r in results for im in r.images])

    def info(self) -> dict:
        return {"providers": list(self.engine.providers), "options": self.spec["engine_options"]}


def preprocess_text(text: str) -> str:
    from engine.text import preprocess

    return preprocess(text, False)


def _worker(spec_path: Path) -> int:
    t_process = time.perf_counter()
    spec = json.loads(spec_path.read_text())

    def tick(n: int = 1) -> None:
        print(f"{PROGRESS} {n}", flush=True)

    side: Side = EagerSide(spec) if spec["side"] == EAGER else EngineSide(spec)
    size, steps, measures = spec["size"], spec["steps"], spec["measures"]
    all_latents = np.load(spec["latents"])
    images_dir = Path(spec["images"])
    images_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"side": spec["side"], "size": size, "steps": steps}

    def timed(fn: Callable[[], Any]) -> list[float]:
        for _ in range(spec["warmup"]):
            fn()
            tick()
        samples = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            tick()
        return samples

    with GpuMemory() as gpu:
        t_import = time.perf_counter()  # the side's heavy imports happened in its constructor
        side.load()
        t_load = time.perf_counter()
        first = side.generate([PROMPTS[0]], all_latents[:1], steps)
        t_first = time.perf_counter()
        np.save(images_dir / "b1.npy", first)
        tick()
        result["cold_start"] = {
            "imports_s": t_import - t_process, "load_s": t_load - t_import, "first_image_s": t_first - t_load,
            "load_to_first_image_s": t_first - t_import,
        }
        if {"text", "step", "decode"} & set(measures):
            side.prepare(size, max(spec["batches"]))
        stages: dict[str, Any] = {}
        if "text" in measures:
            stages["text"] = stats(timed(side.text))
        if "step" in measures:
            for b in spec["batches"]:
                stages[f"step_b{b}"] = stats(timed(lambda b=b: side.step(b)))
        if "decode" in measures:
            stages["decode"] = stats(timed(side.decode))
        result["stages"] = stages
        throughput = {}
        for b in spec["batches"]:
            if (b == 1 and "e2e" not in measures) or (b != 1 and "throughput" not in measures):
                continue
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
            lat = all_latents[:b]
            box: dict[str, np.ndarray] = {}
            samples = timed(lambda p=prompts, x=lat, box=box: box.__setitem__("img", side.generate(p, x, steps)))
            np.save(images_dir / f"b{b}.npy", box["img"])
            s = stats(samples)
            s["images_per_s"] = b / s["median"]
            throughput[str(b)] = s
            if b == 1 and isinstance(side, EngineSide):
                result["engine_timings_b1"] = side.last_timings[0]
        result["e2e"] = throughput
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["peak_gpu_mib"] = gpu.peak_mib if gpu.available else None
    result["info"] = side.info()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


# ---- machine, versions, outputs ---------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
    }
    if shutil.which("nvidia-smi"):
        try:
            info["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def versions() -> dict:
    out = {}
    for pkg in ("torch", "diffusers", "transformers", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _fmt(s: dict | None) -> str:
    if not s:
        return "–"
    if s["median"] < 1:
        return f"{s['median'] * 1000:.1f} ({s['p90'] * 1000:.1f})"
    return f"{s['median']:.2f}s ({s['p90']:.2f}s)"


def markdown(report: dict) -> str:
    st, m = report["settings"], report["machine"]
    sides = st["sides"]
    variants = [s for s in sides if s != EAGER]
    lines = [
        f"# pixart bench: {st['config']}, {st['steps']} steps, guidance {st['guidance']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, {m['os']}, Python {m['python']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        "; ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"Repeats {st['repeats']} after {st['warmup']} warm-up; latency = median (p90), ms below 1 s. "
        "Speed-up = eager median / variant median.",
        "",
    ]
    runs = {(r["side"], r["size"]): r for r in report["runs"]}
    psnrs = {(c["variant"], c["size"], c["batch"]): c for c in report["comparisons"]}
    for size in st["sizes"]:
        head = ["measure", *sides] + [f"speed-up {v}" for v in variants if EAGER in sides]
        lines += [f"## {size}×{size}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows: list[tuple[str, Callable[[dict], dict | None]]] = []
        keys = next((list(r["stages"]) for (s, z), r in runs.items() if z == size), [])
        for k in keys:
            label = {"text": "text encoding (prompt + negative)", "decode": "VAE decode (batch 1)"}.get(
                k, f"transformer step, batch {2 * int(k[6:])} (B={k[6:]})" if k.startswith("step_b") else k)
            rows.append((label, lambda r, k=k: r["stages"].get(k)))
        for b in st["batches"]:
            rows.append((f"end to end, {st['steps']} steps, batch {b}", lambda r, b=b: r["e2e"].get(str(b))))
        for label, get in rows:
            cells = [_fmt(get(runs[(s, size)])) if (s, size) in runs else "–" for s in sides]
            if EAGER in sides:
                ref = get(runs[(EAGER, size)]) if (EAGER, size) in runs else None
                for v in variants:
                    ours = get(runs[(v, size)]) if (v, size) in runs else None
                    cells.append(f"{ref['median'] / ours['median']:.2f}×" if ref and ours else "–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        def rate(r: dict) -> str:
            return " / ".join(f"{r['e2e'][str(b)]['images_per_s']:.3f}" for b in st["batches"] if str(b) in r["e2e"])

        extra = [
            ("throughput, images/s (batch " + ", ".join(map(str, st["batches"])) + ")", rate),
            ("cold start: load → first image", lambda r: f"{r['cold_start']['load_to_first_image_s']:.2f}s"
             f" (+{r['cold_start']['imports_s']:.1f}s imports)"),
            ("peak RSS", lambda r: f"{r['peak_rss_mib'] / 1024:.2f} GiB"),
            ("peak GPU memory", lambda r: f"{r['peak_gpu_mib'] / 1024:.2f} GiB" if r.get("peak_gpu_mib") else "–"),
        ]
        for label, get in extra:
            cells = [get(runs[(s, size)]) if (s, size) in runs else "–" for s in sides]
            lines.append(f"| {label} | " + " | ".join(cells) + " |" + " |" * (len(head) - len(sides) - 1))
        lines.append("")
        for v in variants:
            for b in st["batches"]:
                c = psnrs.get((v, size, b))
                if c:
                    q = c.get("error") or f"PSNR {c['psnr_db']:.1f} dB, max |diff| {c['max_abs_diff']}/255"
                    lines.append(f"- images {v} vs eager, batch {b}: {q}")
        lines.append("")
    lines.append("## Models")
    lines.append("")
    lines.append("| size | export (s) | export size | build (s) | cached |")
    lines.append("|---|---|---|---|---|")
    for size, info in report["models"].items():
        build = f"{info['build_seconds']:.1f}" if info.get("build_seconds") is not None else "–"
        lines.append(f"| {size} | {info['export_seconds']} | {info['export_bytes'] / 2**30:.2f} GiB | {build} | "
                     f"{info['export_cached']} |")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    st = report["settings"]
    sides, sizes = st["sides"], st["sizes"]
    runs = {(r["side"], r["size"]): r for r in report["runs"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(len(sides), 1)

    stage_keys = ["text", "step_b1", "decode"]
    ax = axes[0]
    for i, s in enumerate(sides):
        vals = [runs[(s, sizes[0])]["stages"].get(k, {}).get("median", 0) if (s, sizes[0]) in runs else 0
                for k in stage_keys]
        ax.bar(np.arange(len(stage_keys)) + i * width, vals, width, label=s)
    ax.set_xticks(np.arange(len(stage_keys)) + width * (len(sides) - 1) / 2, ["text", "step (2B=2)", "decode"])
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"stages at {sizes[0]}²")
    ax.legend()

    ax = axes[1]
    for i, s in enumerate(sides):
        vals = [runs[(s, z)]["e2e"].get("1", {}).get("median", 0) if (s, z) in runs else 0 for z in sizes]
        ax.bar(np.arange(len(sizes)) + i * width, vals, width, label=s)
    ax.set_xticks(np.arange(len(sizes)) + width * (len(sides) - 1) / 2, [f"{z}²" for z in sizes])
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"end to end, {st['steps']} steps, batch 1")
    ax.legend()

    ax = axes[2]
    for s in sides:
        for z in sizes:
            r = runs.get((s, z))
            if not r:
                continue
            bs = [b for b in st["batches"] if str(b) in r["e2e"]]
            ax.plot(bs, [r["e2e"][str(b)]["images_per_s"] for b in bs], marker="o", label=f"{s} {z}²")
    ax.set_xlabel("batch")
    ax.set_ylabel("images/s")
    ax.set_title("throughput")
    ax.legend(fontsize="small")
    fig.suptitle(f"pixart bench — {st['config']} — {report['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the .tmp name hides the format
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """JSON, Markdown and PNG; each written to a .tmp first so that a crash never leaves half a file."""
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    writers = {
        "json": lambda p: p.write_text(json.dumps(report, indent=2, default=float)),
        "md": lambda p: p.write_text(markdown(report)),
        "png": lambda p: plot(report, p),
    }
    for kind, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        writers[kind](tmp)
        tmp.replace(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
