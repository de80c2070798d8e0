"""The report of a `pixart bench` run: its Markdown tables, its plot, and the JSON, Markdown and PNG files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.bench_options import EAGER


def _fmt(s: dict | None) -> str:
    if not s:
        return "–"
    if s["median"] < 1:
        return f"{s['median'] * 1000:.1f} ({s['p90'] * 1000:.1f})"
    return f"{s['median']:.2f}s ({s['p90']:.2f}s)"


def markdown(report: dict) -> str:
    st, m = report["settings"], report["machine"]
    sides = st["sides"]
    variants = [s for s in sides if s != EAGER]
    lines = [
        f"# pixart bench: {st['config']}, {st['steps']} steps, guidance {st['guidance']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, {m['os']}, Python {m['python']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        "; ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"Repeats {st['repeats']} after {st['warmup']} warm-up; latency = median (p90), ms below 1 s. "
        "Speed-up = eager median / variant median.",
        "",
    ]
    runs = {(r["side"], r["size"]): r for r in report["runs"]}
    psnrs = {(c["variant"], c["size"], c["batch"]): c for c in report["comparisons"]}
    for size in st["sizes"]:
        head = ["measure", *sides] + [f"speed-up {v}" for v in variants if EAGER in sides]
        lines += [f"## {size}×{size}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows: list[tuple[str, Callable[[dict], dict | None]]] = []
        keys = next((list(r["stages"]) for (s, z), r in runs.items() if z == size), [])
        for k in keys:
            label = {"text": "text encoding (prompt + negative)", "decode": "VAE decode (batch 1)"}.get(
                k, f"transformer step, batch {2 * int(k[6:])} (B={k[6:]})" if k.startswith("step_b") else k)
            rows.append((label, lambda r, k=k: r["stages"].get(k)))
        for b in st["batches"]:
            rows.append((f"end to end, {st['steps']} steps, batch {b}", lambda r, b=b: r["e2e"].get(str(b))))
        for label, get in rows:
            cells = [_fmt(get(runs[(s, size)])) if (s, size) in runs else "–" for s in sides]
            if EAGER in sides:
                ref = get(runs[(EAGER, size)]) if (EAGER, size) in runs else None
                for v in variants:
                    ours = get(runs[(v, size)]) if (v, size) in runs else None
                    cells.append(f"{ref['median'] / ours['median']:.2f}×" if ref and ours else "–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        def rate(r: dict) -> str:
            return " / ".join(f"{r['e2e'][str(b)]['images_per_s']:.3f}" for b in st["batches"] if str(b) in r["e2e"])

        extra = [
            ("throughput, images/s (batch " + ", ".join(map(str, st["batches"])) + ")", rate),
            ("cold start: load → first image", lambda r: f"{r['cold_start']['load_to_first_image_s']:.2f}s"
             f" (+{r['cold_start']['imports_s']:.1f}s imports)"),
            ("peak RSS", lambda r: f"{r['peak_rss_mib'] / 1024:.2f} GiB"),
            ("peak GPU memory", lambda r: f"{r['peak_gpu_mib'] / 1024:.2f} GiB" if r.get("peak_gpu_mib") else "–"),
        ]
        for label, get in extra:
            cells = [get(runs[(s, size)]) if (s, size) in runs else "–" for s in sides]
            lines.append(f"| {label} | " + " | ".join(cells) + " |" + " |" * (len(head) - len(sides) - 1))
        lines.append("")
        for v in variants:
            for b in st["batches"]:
                c = psnrs.get((v, size, b))
                if c:
                    q = c.get("error") or f"PSNR {c['psnr_db']:.1f} dB, max |diff| {c['max_abs_diff']}/255"
                    lines.append(f"- images {v} vs eager, batch {b}: {q}")
        lines.append("")
    not_measured = {**{name: f"skipped: {why}" for name, why in report.get("skipped", {}).items()},
                    **{name: "failed: " + _last_line(error) for name, error in report.get("failed", {}).items()}}
    if not_measured:
        lines += ["## Not measured", "", "| variant | why |", "|---|---|"]
        lines += [f"| {name} | {why} |" for name, why in not_measured.items()]
        lines.append("")
    lines.append("## Models")
    lines.append("")
    lines.append("| size | export (s) | export size | build (s) | cached |")
    lines.append("|---|---|---|---|---|")
    for size, info in report["models"].items():
        build = f"{info['build_seconds']:.1f}" if info.get("build_seconds") is not None else "–"
        lines.append(f"| {size} | {info['export_seconds']} | {info['export_bytes'] / 2**30:.2f} GiB | {build} | "
                     f"{info['export_cached']} |")
    lines.append("")
    return "\n".join(lines)


def _last_line(error: str) -> str:
    """The error's last non-empty line (a traceback ends with the exception), cut for a table cell."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return (lines[-1] if lines else error)[:300].replace("|", "/")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    st = report["settings"]
    sides, sizes = st["sides"], st["sizes"]
    runs = {(r["side"], r["size"]): r for r in report["runs"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(len(sides), 1)

    stage_keys = ["text", "step_b1", "decode"]
    ax = axes[0]
    for i, s in enumerate(sides):
        vals = [runs[(s, sizes[0])]["stages"].get(k, {}).get("median", 0) if (s, sizes[0]) in runs else 0
                for k in stage_keys]
        ax.bar(np.arange(len(stage_keys)) + i * width, vals, width, label=s)
    ax.set_xticks(np.arange(len(stage_keys)) + width * (len(sides) - 1) / 2, ["text", "step (2B=2)", "decode"])
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"stages at {sizes[0]}²")
    ax.legend()

    ax = axes[1]
    for i, s in enumerate(sides):
        vals = [runs[(s, z)]["e2e"].get("1", {}).get("median", 0) if (s, z) in runs else 0 for z in sizes]
        ax.bar(np.arange(len(sizes)) + i * width, vals, width, label=s)
    ax.set_xticks(np.arange(len(sizes)) + width * (len(sides) - 1) / 2, [f"{z}²" for z in sizes])
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"end to end, {st['steps']} steps, batch 1")
    ax.legend()

    ax = axes[2]
    for s in sides:
        for z in sizes:
            r = runs.get((s, z))
            if not r:
                continue
            bs = [b for b in st["batches"] if str(b) in r["e2e"]]
            ax.plot(bs, [r["e2e"][str(b)]["images_per_s"] for b in bs], marker="o", label=f"{s} {z}²")
    ax.set_xlabel("batch")
    ax.set_ylabel("images/s")
    ax.set_title("throughput")
    ax.legend(fontsize="small")
    fig.suptitle(f"pixart bench — {st['config']} — {report['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the .tmp name hides the format
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """JSON, Markdown and PNG; each written to a .tmp first so that a crash never leaves half a file."""
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    writers = {
        "json": lambda p: p.write_text(json.dumps(report, indent=2, default=float)),
        "md": lambda p: p.write_text(markdown(report)),
        "png": lambda p: plot(report, p),
    }
    for kind, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        writers[kind](tmp)
        tmp.replace(path)
    return paths
