"""Where the benchmarks run and write."""

from __future__ import annotations

from pathlib import Path

# the repository root: the working directory (and import root) of the benchmarks' child processes
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"  # where results go unless --out-dir says otherwise
