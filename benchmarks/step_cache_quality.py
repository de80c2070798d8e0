"""What step caching costs in quality, measured on the trained embedded default (the only trained model here).

    python -m benchmarks.step_cache_quality EXPORT_DIR [--mechanism forecast|blocks] [--out benchmarks/results]
        [--set fast.threshold=0.4 ...]

The 36 held-out prompts of default_model.evaluate through the engine, for both samplers at guidance 1 and 4.5, with
each step-cache mode on the same seeds: accuracy per attribute (the evaluation's scorer), PSNR and SSIM against
"off", and the fraction of transformer row-steps computed, overall and at each step (the decisions `pixart bench`
replays on models without trained weights). With the "blocks" mechanism a computed row-step is one that ran the
transformer's body, and "transformer work" adds the head every row runs (its share of the blocks). `--set
MODE.FIELD=VALUE` changes a policy for the run (how the shipped policies were chosen); the report records the
policies it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks.common.images import psnr, ssim
from benchmarks.common.report import write_report
from default_model import evaluate, scenes
from engine.vocabulary import STEP_CACHE_MECHANISMS


def run(engine, modes: tuple[str, ...], n: int = len(scenes.HELD_OUT)) -> list[dict]:
    """One row per (sampler, guidance, mode)."""
    from engine.vocabulary import SCHEDULERS

    head = head_share(engine)
    prompts = scenes.held_out_prompts(n)
    rows = []
    for scheduler in SCHEDULERS:
        for guidance in (1.0, 4.5):
            reference: list[np.ndarray] = []
            for mode in modes:
                pictures, computed, cached, started = [], 0, 0, time.perf_counter()
                per_step = np.zeros(evaluate.STEPS)
                for i, (text, _) in enumerate(prompts):
                    size = evaluate.SIZES[i % len(evaluate.SIZES)]
                    result, steps = generate(engine, evaluate.request_for(text, size, guidance, scheduler, seed=i,
                                                                          step_cache=mode))
                    pictures.append(result.images[0].pixels)
                    computed, cached = computed + result.steps_computed, cached + result.steps_cached
                    per_step += steps
                seconds = time.perf_counter() - started
                reference = reference or pictures
                accuracy = scenes.score([scenes.read_picture(p) for p in pictures], [s for _, s in prompts])
                rows.append({
                    "sampler": scheduler, "guidance": guidance, "mode": mode, **accuracy,
                    "computed": computed / (computed + cached),
                    "work": (head + (1 - head) * computed / (computed + cached)) if mode != "off" else 1.0,
                    "computed_per_step": [round(float(f), 4) for f in per_step / len(prompts)],
                    "psnr": float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(pictures, reference, strict=True)])),
                    "ssim": float(np.mean([ssim(a, b) for a, b in zip(pictures, reference, strict=True)])),
                    "seconds": seconds,
                })
                print(_line(rows[-1]), flush=True)
    return rows


def generate(engine, request) -> tuple:
    """The result, and the fraction of the request's rows computed at each step (stepped as the server does)."""
    g = engine.prepare(request)
    fractions = []
    while not g.done:
        before = g.steps_computed
        engine.step([g])
        fractions.append((g.steps_computed - before) / g.rows)
    (result,) = engine.finish([g])
    return result, np.array(fractions)


def head_share(engine) -> float:
    """The share of the transformer's blocks every row runs whatever it decides: the head's with the "blocks"
    mechanism, none with "forecast"."""
    if engine.step_cache_mechanism != "blocks":
        return 0.0
    transformer = engine.manifest["transformer"]
    return transformer["head_blocks"] / transformer["config"]["num_layers"]


def _line(row: dict) -> str:
    return (f"| {row['sampler']} | {row['guidance']:g} | {row['mode']} | {row['computed']:.0%} | {row['work']:.0%} | "
            + " | ".join(f"{row[k]:.0%}" for k in scenes.ATTRIBUTES)
            + f" | {row['psnr']:.1f} | {row['ssim']:.3f} | {row['seconds']:.1f} |")


HEADER = ("| sampler | guidance | step cache | row-steps computed | transformer work | colour | position | "
          "background | all three | PSNR vs off (dB, capped at 99) | SSIM vs off | seconds |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def apply_settings(settings: list[str], mechanism: str = "forecast") -> dict:
    """`MODE.FIELD=VALUE` into the mechanism's policies (engine.step_cache.POLICIES or BLOCK_POLICIES); returns
    them."""
    from engine.step_cache import BLOCK_POLICIES, POLICIES

    policies = POLICIES if mechanism == "forecast" else BLOCK_POLICIES
    for setting in settings:
        target, _, value = setting.partition("=")
        mode, _, name = target.partition(".")
        policy = policies[mode]
        kind = type(getattr(policy, name))
        policies[mode] = dataclasses.replace(policy, **{name: kind(value)})
    return policies


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--out", default=None, help="write step-cache-quality.json/.md here")
    p.add_argument("--modes", default="off,balanced,fast")
    p.add_argument("--mechanism", default="forecast", choices=STEP_CACHE_MECHANISMS)
    p.add_argument("--prompts", type=int, default=len(scenes.HELD_OUT))
    p.add_argument("--set", action="append", default=[], dest="settings", metavar="MODE.FIELD=VALUE")
    a = p.parse_args(argv)
    from engine import Engine

    policies = apply_settings(a.settings, a.mechanism)
    engine = Engine.load(a.export_dir, step_cache_mechanism=a.mechanism)
    print(HEADER)
    rows = run(engine, tuple(a.modes.split(",")), a.prompts)
    if a.out:
        report = {"steps": evaluate.STEPS, "prompts": a.prompts, "rows": rows, "mechanism": a.mechanism,
                  "policies": {m: dataclasses.asdict(p) for m, p in policies.items()}}
        name = "step-cache-quality" + ("" if a.mechanism == "forecast" else f"-{a.mechanism}")
        command = f"python -m benchmarks.step_cache_quality EXPORT_DIR --mechanism {a.mechanism} --out {a.out}"
        markdown = (f"Step caching ({a.mechanism}) on the trained embedded default: {a.prompts} held-out prompts, "
                    f"{evaluate.STEPS} "
                    f"steps, seeds 0..{a.prompts - 1}.\n\n{HEADER}\n" + "\n".join(_line(r) for r in rows)
                    + f"\n\nMade by `{command}`.\n")
        print(write_report(Path(a.out), name, report, markdown))


if __name__ == "__main__":
    main()
