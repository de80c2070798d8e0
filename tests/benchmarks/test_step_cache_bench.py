"""The step-cache benchmarks: the quality report records per-step decisions, and a bench variant replays them."""

from __future__ import annotations

import json

import pytest

from benchmarks import step_cache_quality, step_cache_replay
from engine import GenerationRequest, step_cache


def test_the_quality_report_has_each_modes_decisions_per_step(default_export, tmp_path):
    step_cache_quality.main([str(default_export), "--out", str(tmp_path), "--prompts", "2", "--modes", "off,fast"])
    report = json.loads((tmp_path / "step-cache-quality.json").read_text())
    assert len(report["rows"]) == 8 and report["policies"]["fast"]["threshold"] == step_cache.POLICIES["fast"].threshold
    for row in report["rows"]:
        assert len(row["computed_per_step"]) == 20
        if row["mode"] == "off":
            assert row["computed"] == 1.0 and row["psnr"] == 99.0
        else:
            assert row["computed"] < 1.0 and row["computed_per_step"][:2] == [1.0, 1.0]
    assert "| DPM-SOLVER | 4.5 | fast |" in (tmp_path / "step-cache-quality.md").read_text()


def test_a_replayed_variant_computes_exactly_the_recorded_steps(engine, tmp_path, monkeypatch):
    plan = [True, True, False, True, False, False, True, True]
    report = tmp_path / "decisions.json"
    report.write_text(json.dumps({"rows": [
        {"sampler": "DPM-SOLVER", "guidance": 4.5, "mode": "fast", "computed_per_step": [float(p) for p in plan]}]}))
    with pytest.raises(SystemExit, match="8 steps, not 20"):
        step_cache_replay.schedules(report, 4.5, 20)
    monkeypatch.setattr(step_cache.RowCache, "computes", step_cache.RowCache.computes)  # restored afterwards
    step_cache_replay.install(report, 4.5, 8)
    result = engine.generate(GenerationRequest(prompt="a red circle", image_size=(256, 256), num_inference_steps=8,
                                               seed=1, step_cache="fast"))
    assert (result.steps_computed, result.steps_cached) == (2 * sum(plan), 2 * (len(plan) - sum(plan)))
