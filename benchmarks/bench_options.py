"""The `pixart bench` command line: its flags, what --variants and --only parse to, and the command that
reproduces a run (recorded in the reports of `pixart bench` and `pixart bench --memory`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.common.paths import RESULTS

MEASURES = ("text", "step", "decode", "e2e", "throughput")
EAGER = "eager"


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


def parse_ints(text: str) -> list[int]:
    """A comma list of integers (--sizes, --batches)."""
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


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (sys.argv is the caller's, e.g. pytest's, when called from code)."""
    parts = [f"pixart bench --config {args.config} --sizes {args.sizes} --steps {args.steps} --repeats {args.repeats}",
             f"--warmup {args.warmup} --batches {args.batches}"]
    if args.only:
        parts.append(f"--only {args.only}")
    if parse_variants(args.variants) != {"engine": {}}:
        parts.append(f"--variants '{args.variants}'")
    return " ".join(parts)
