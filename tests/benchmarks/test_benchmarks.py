"""The benchmark harness runs end to end on the tiny model and writes its three outputs; no timing is asserted."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench
from benchmarks.bench_options import MEASURES, parse_variants, select
from benchmarks.common.images import psnr


def test_variants_and_only_parse():
    variants = parse_variants('{"engine": {}, "engine-b": {"providers": ["CPUExecutionProvider"]}}')
    assert list(variants) == ["engine", "engine-b"]
    sides, measures = select("eager,engine-b,e2e", variants)
    assert sides == ["eager", "engine-b"] and measures == ["e2e"]
    assert select("", variants) == (["eager", "engine", "engine-b"], list(MEASURES))
    with pytest.raises(SystemExit):
        select("nonsense", variants)
    with pytest.raises(SystemExit):
        parse_variants('{"eager": {}}')


def test_psnr():
    import numpy as np

    a = np.zeros((2, 2, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert 40 < psnr(a, a + 1) < 50


@pytest.mark.timeout(300)
def test_bench_tiny_writes_json_markdown_and_plot(tmp_path):
    rc = bench.main([
        "--config", "tiny", "--sizes", "256", "--steps", "1", "--repeats", "1", "--warmup", "0", "--batches", "1",
        "--out-dir", str(tmp_path), "--no-progress",
        "--variants", '{"engine": {}, "broken": {"variant": "no-such-graph-set"}}',
    ])
    assert rc == 1  # a variant failed: said in the exit code, and reported with the others' figures
    report = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert {r["side"] for r in report["runs"]} == {"eager", "engine"}
    assert list(report["failed"]) == ["broken at 256²"] and "no-such-graph-set" in report["failed"]["broken at 256²"]
    for r in report["runs"]:
        assert r["size"] == 256
        assert {"text", "step_b1", "decode"} <= set(r["stages"])
        assert r["e2e"]["1"]["n"] == 1 and r["e2e"]["1"]["images_per_s"] > 0
        assert r["peak_rss_mib"] > 0 and r["cold_start"]["load_to_first_image_s"] > 0
    (cmp,) = report["comparisons"]
    # The same weights and latents on both sides: the pictures must agree, whatever the speeds.
    assert cmp["variant"] == "engine" and cmp["psnr_db"] >= 40
    assert {"cpu", "cores", "ram_gib", "os", "python"} <= set(report["machine"])
    assert {"torch", "diffusers", "transformers"} <= set(report["versions"])
    md = (tmp_path / "bench-tiny.md").read_text()
    assert "| eager | engine | broken |" in md and "PSNR" in md and "| broken at 256² | failed: " in md
    png = (tmp_path / "bench-tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_benchmark_script_runs_end_to_end_on_cpu(small_export, tmp_path):
    """benchmarks/gpu.sh, as it runs on the GPU machine, but on the CPU with the small config: eager, the fp16
    engine with and without IO binding and with step caching (decisions replayed) run and are compared; CUDA graphs
    and TensorRT are skipped, with reasons."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DEVICE="cpu", CONFIG="small", SIZE="256", STEPS="2", REPEATS="1", ONLY="e2e,step",
               OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench-small-gpu-cpu.json").read_text())
    assert report["device"] == "cpu"
    assert set(report["skipped"]) == {"engine_fp16_cuda_graphs", "engine_tensorrt"}
    assert {r["side"] for r in report["runs"]} == {"eager", "engine_fp16", "engine_fp16_iobinding",
                                                   "engine_fp16_iobinding_balanced_replayed",
                                                   "engine_fp16_iobinding_fast_replayed"}
    for r in report["runs"]:
        assert {"step_b1", "step_b4"} <= set(r["stages"]) and r["e2e"]["1"]["n"] == 1
    psnrs = {c["variant"]: c["psnr_db"] for c in report["comparisons"]}
    assert psnrs["engine_fp16"] > 30 and psnrs["engine_fp16_iobinding"] == psnrs["engine_fp16"]
    assert "| eager |" in done.stdout  # the table, printed last


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_first_run_script_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu_first_run.sh as it runs on the GPU machine, on the CPU: every section is measured, and what
    needs CUDA is skipped with its reason."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_first_run.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=550)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-first-run-cpu.json").read_text())
    assert set(report["skipped"]) == {"cuda_graphs", "eager_fp16", "device_memory"}
    for name in ("fp32", "fp16", "vae"):
        placed = report["placement"][name]
        assert placed["providers"][0] == "CPUExecutionProvider" and placed["memcpy_nodes"] == 0
    shapes = [(s["side"], s["rows"]) for s in report["steps"]]
    assert shapes == [(256, 2), (256, 4), (128, 2)]
    for step in report["steps"]:
        assert {"engine_fp32", "engine_fp16", "eager_fp32"} == set(step) - {"side", "rows"}
        assert all(step[k]["median_ms"] > 0 for k in ("engine_fp32", "engine_fp16", "eager_fp32"))
    assert all(set(h["update_ms"]) == {"DPM-SOLVER", "SA-SOLVER"} and h["device_update_ms"] > 0
               for h in report["host"])
    assert report["precision"]["finite"] and report["precision"]["cosine"] > 0.999
    assert report["vae"]["finite"] and report["vae"]["side"] == 256
    assert "| 256² rows 2 |" in done.stdout  # the table, printed last
