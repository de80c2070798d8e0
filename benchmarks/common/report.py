"""Writing a benchmark's report: its figures as JSON and its table as Markdown, side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out_dir: Path, stem: str, report: dict, markdown: str) -> dict[str, Path]:
    """`<stem>.json` (the report) and `<stem>.md` (its table) in `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["md"].write_text(markdown)
    return paths
