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
    fractions = step_cache_replay.recorded(report, 4.5)["fast"]
    assert step_cache_replay.recorded(report, 3.0) == {"fast": fractions}  # the nearest guidance recorded
    # at another step count, each step takes the decision recorded at the same fraction of the run
    assert [step_cache_replay.computes(fractions, i, 3) for i in range(3)] == [True, False, True]
    monkeypatch.setattr(step_cache.RowCache, "computes", step_cache.RowCache.computes)  # restored afterwards
    step_cache_replay.install(report, 4.5)
    result = engine.generate(GenerationRequest(prompt="a red circle", image_size=(256, 256), num_inference_steps=8,
                                               seed=1, step_cache="fast"))
    assert (result.steps_computed, result.steps_cached) == (2 * sum(plan), 2 * (len(plan) - sum(plan)))


def test_diffusers_first_block_cache_runs_on_the_same_weights(default_export, tmp_path):
    from benchmarks import step_cache_diffusers

    step_cache_diffusers.main([str(default_export), "--prompts", "1", "--thresholds", "0.5", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "step-cache-diffusers.json").read_text())["rows"]
    assert [(r["guidance"], r["threshold"]) for r in rows] == [(1.0, None), (1.0, 0.5), (4.5, None), (4.5, 0.5)]
    for off, cached in (rows[:2], rows[2:]):
        assert off["rest_computed"] == 1.0 and off["psnr"] == 99.0
        assert cached["rest_computed"] < 1.0, "the hook skipped the remaining blocks on some steps"
        assert cached["blocks_computed"] > cached["rest_computed"], "the first block always runs"


@pytest.mark.timeout(600)
def test_the_open_loop_load_test_measures_a_caching_server(default_export, tmp_path):
    from benchmarks import load

    assert load.main(["--engine", str(default_export), "--arrival", "poisson", "--modes", "continuous_balanced",
                      "--loads", "0.5", "--arrivals", "4", "--mix-steps", "20", "--mix-sizes", "256x256",
                      "--out-dir", str(tmp_path), "--tag", "t"]) == 0
    report = json.loads((tmp_path / "loadtest-poisson-t.json").read_text())
    assert report["capacity_step_cache"]["requests_per_s"] > 0
    (run,) = report["runs"]
    assert run["mode"] == "continuous_balanced" and not run["errors"]
    assert "With step cache `balanced`" in (tmp_path / "loadtest-poisson-t.md").read_text()
