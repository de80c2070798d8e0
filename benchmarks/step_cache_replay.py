"""Step-cache decisions measured on the trained default, replayed on a model without trained weights.

Random weights do not change from step to step the way a trained model does, so their own caching decisions say
nothing about a real model's; `pixart bench` variants that name `replay_step_cache` (the JSON of
benchmarks/step_cache_quality.py) compute exactly the steps the trained default computed at the same step count
(20 in the committed report), and forecast the rest, so they time the work a trained model would skip. At another
step count a step takes the decision recorded at the same fraction of the run (the nearest recorded step): an
approximation, which the report's step count shows. Used only inside a bench worker process.
"""

from __future__ import annotations

import json
from pathlib import Path


def recorded(report: Path, guidance: float, sampler: str = "DPM-SOLVER") -> dict[str, list[float]]:
    """mode -> the fraction of the trained default's rows computed at each step (at the nearest guidance the report
    has)."""
    rows = [r for r in json.loads(Path(report).read_text())["rows"] if r["sampler"] == sampler and r["mode"] != "off"]
    if not rows:
        raise SystemExit(f"replay_step_cache: {report} has no {sampler} rows")
    nearest = min((r["guidance"] for r in rows), key=lambda g: abs(g - guidance))
    return {r["mode"]: r["computed_per_step"] for r in rows if r["guidance"] == nearest}


def computes(fractions: list[float], step_index: int, total_steps: int) -> bool:
    """Whether step `step_index` of `total_steps` computes: most rows computed at that point of the recorded run."""
    at = round(step_index * (len(fractions) - 1) / max(total_steps - 1, 1))
    return fractions[at] >= 0.5


def install(report: Path, guidance: float) -> None:
    """Every row of a cached request computes exactly at the replayed steps (once it has two outputs to forecast
    from, which the recorded runs always had)."""
    from engine import step_cache

    by_policy = {id(step_cache.POLICIES[mode]): f for mode, f in recorded(report, guidance).items()}

    def replayed(self, x, step_index: int, total_steps: int) -> bool:
        return len(self.outputs) < 2 or computes(by_policy[id(self.policy)], step_index, total_steps)

    step_cache.RowCache.computes = replayed
