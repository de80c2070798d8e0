"""Step-cache decisions measured on the trained default, replayed on a model without trained weights.

Random weights do not change from step to step the way a trained model does, so their own caching decisions say
nothing about a real model's; `pixart bench` variants that name `replay_step_cache` (the JSON of
benchmarks/step_cache_quality.py) compute exactly the steps the trained default computed, at the same step count,
and forecast the rest, so they time the work a trained model would skip. Used only inside a bench worker process.
"""

from __future__ import annotations

import json
from pathlib import Path


def schedules(report: Path, guidance: float, steps: int, sampler: str = "DPM-SOLVER") -> dict[str, list[bool]]:
    """mode -> whether each step computes: the steps where most of the trained default's rows computed."""
    data = json.loads(Path(report).read_text())
    out = {}
    for row in data["rows"]:
        if row["sampler"] == sampler and row["guidance"] == guidance and row["mode"] != "off":
            fractions = row["computed_per_step"]
            if len(fractions) != steps:
                raise SystemExit(f"replay_step_cache: {report} has decisions for {len(fractions)} steps, not {steps}")
            out[row["mode"]] = [f >= 0.5 for f in fractions]
    if not out:
        raise SystemExit(f"replay_step_cache: {report} has no {sampler} rows at guidance {guidance:g}")
    return out


def install(report: Path, guidance: float, steps: int) -> None:
    """Every row of a cached request computes exactly at the replayed steps (once it has two outputs to forecast
    from, which the recorded runs always had)."""
    from engine import step_cache

    by_policy = {id(step_cache.POLICIES[mode]): plan for mode, plan in schedules(report, guidance, steps).items()}

    def computes(self, x, step_index: int, total_steps: int) -> bool:
        return len(self.outputs) < 2 or by_policy[id(self.policy)][step_index]

    step_cache.RowCache.computes = computes
