"""The soak harness behind the README's leak figures, on a few seconds of traffic (no growth figure is asserted:
seconds say nothing about leaks; what is checked is that it drives every kind of call without an error and reports
each replica's resources)."""

from __future__ import annotations

import json

import pytest

from tests.support.servers import export_dir

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_the_soak_drives_mixed_traffic_and_reports_resources(tmp_path) -> None:
    pytest.importorskip("pgserver")
    from benchmarks import soak

    assert soak.main(["--engine", str(export_dir()), "--minutes", "0.15", "--warmup-minutes", "0.05",
                      "--sample-seconds", "3", "--workers", "3", "--steps", "2", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["errors"] == {} and sum(report["done"].values()) >= 4
    assert len(report["replicas"]) == 2 and len(report["samples"]) >= 2
    for measures in report["replicas"].values():
        assert set(measures) == {"rss_kib", "open_files", "threads"} and measures["rss_kib"]["start"] > 0
    assert report["database_connections"]["start"] >= 2
    assert "Made by `python -m benchmarks.soak" in (tmp_path / "soak.md").read_text()
