"""`pixart loadtest`: load against `pixart serve`, closed-loop (N clients) or open-loop (Poisson arrivals).

Closed loop (default): N concurrent clients for a fixed duration or request count. Given --engine instead of
--address it starts the server itself, once per --max-batch value (default "1,4").

Open loop (`--arrival poisson`, with --engine): requests arrive at random (exponential gaps, one seeded schedule
shared by every server), mixing step counts (--mix-steps) and sizes (--mix-sizes). Capacity is measured first:
the mix's requests one after another on a server without batching; then each load level (--loads, fractions of
that capacity) runs against each server mode (--modes: none = no batching, request = request-level batching,
continuous = iteration-level batching), so every figure comes from one run on one machine.

Per request it keeps the client-side latency and the server's own split (Timings.queue against the rest), and
reports p50/p90/p99, images/s and errors; JSON, Markdown and (open loop) a plot go to --out-dir.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.machine import machine_info, versions
from benchmarks.common.paths import RESULTS
from benchmarks.common.prompts import PROMPTS
from benchmarks.common.report import write_report
from benchmarks.common.serve import ServeProcess
from benchmarks.models import CONFIGS, cached_export


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--address", help="a running server, host:port")
    target.add_argument("--engine", help="an export folder: start `pixart serve` on it for each --max-batch")
    target.add_argument("--config", choices=CONFIGS,
                        help="a benchmark config (benchmarks.models) laid out for 256², exported once and cached: "
                        "its export is --engine")
    p.add_argument("--max-batch", default="1,4", help="with --engine: server --max-batch values (1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="with --engine: server batching window")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (ignored with --requests)")
    p.add_argument("--requests", type=int, default=0, help="total requests instead of a duration")
    p.add_argument("--size", type=int, default=512, help="square image side")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--key", default=None, help="API key (PIXART_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline in seconds")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--arrival", choices=("closed", "poisson"), default="closed",
                   help="closed: --clients loop back to back; poisson: open-loop random arrivals (needs --engine)")
    p.add_argument("--modes", default="none,request,continuous", help="poisson: server batching modes to compare")
    p.add_argument("--loads", default="0.5,0.8,1.0", help="poisson: arrival rates as fractions of measured capacity")
    p.add_argument("--mix-steps", default="4,20,35", help="poisson: step counts, drawn uniformly per request")
    p.add_argument("--mix-sizes", default="256x256,448x256",
                   help="poisson: image sizes (WIDTHxHEIGHT), drawn uniformly; on the default model these are two bins")
    p.add_argument("--arrivals", type=int, default=60, help="poisson: requests per load level and mode")
    p.add_argument("--seed", type=int, default=0, help="poisson: seed of the schedule")


def register(subparsers: Any) -> None:
    """Add `loadtest` to the main CLI's subparsers (sets `func`)."""
    p = subparsers.add_parser("loadtest", help="concurrent gRPC clients against pixart serve")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixart loadtest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def drive(address: str, args: argparse.Namespace) -> dict:
    """Run the clients against `address` until the duration or the request count is spent."""
    from server.client import Client, PixArtError

    lock = threading.Lock()
    records: list[dict] = []
    errors: dict[str, int] = {}
    issued = [0]
    deadline = time.perf_counter() + args.duration

    def take() -> int | None:
        # One shared counter: with --requests the total is exact whatever the clients' speeds.
        with lock:
            if args.requests and issued[0] >= args.requests:
                return None
            if not args.requests and time.perf_counter() >= deadline:
                return None
            issued[0] += 1
            return issued[0]

    def client_loop() -> None:
        with Client(address, args.key, timeout=args.timeout) as client:
            while (n := take()) is not None:
                t0 = time.perf_counter()
                try:
                    res = client.generate(
                        PROMPTS[n % len(PROMPTS)], image_size=(args.size, args.size),
                        num_inference_steps=args.steps, seed=n,
                    )
                except PixArtError as e:
                    with lock:
                        errors[e.code.name] = errors.get(e.code.name, 0) + 1
                    continue
                except Exception as e:  # a broken connection is an error of the run, not of the harness
                    with lock:
                        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                t = res.timings
                with lock:
                    records.append({
                        "latency": time.perf_counter() - t0, "queue": t.queue, "inference": t.total - t.queue,
                        "images": len(res.images), "done": time.perf_counter(),
                    })

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(args.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - started
    images = sum(r["images"] for r in records)
    return {
        "wall_s": wall,
        "completed": len(records),
        "errors": errors,
        "images_per_s": images / wall if wall > 0 else 0.0,
        "latency_s": percentiles([r["latency"] for r in records]),
        "queue_s": percentiles([r["queue"] for r in records]),
        "inference_s": percentiles([r["inference"] for r in records]),
    }


# server flags of each batching mode of the open-loop comparison
MODES = {
    "none": ["--batching", "request", "--max-batch", "1"],
    "request": ["--batching", "request", "--max-batch", "4", "--max-batch-images", "4"],
    "continuous": ["--batching", "continuous", "--max-batch", "4", "--max-batch-images", "4"],
    # iteration-level batching with step caching as the server's default (a trained model's own decisions)
    "continuous_balanced": ["--batching", "continuous", "--max-batch", "4", "--max-batch-images", "4",
                            "--step-cache", "balanced"],
}
CACHED_CAPACITY = ["--batching", "request", "--max-batch", "1", "--step-cache", "balanced"]


def start_server(engine: str, max_batch: int, max_wait_ms: float, work: Path,
                 flags: list[str] | None = None, name: str = "") -> ServeProcess:
    """`pixart serve` on a free port, with its queue store in `work`; returns once it is accepting."""
    name = name or str(max_batch)
    flags = flags if flags is not None else ["--max-batch", str(max_batch), "--max-batch-images",
                                             str(max(max_batch, 8))]
    # a large model's warm-up can take minutes on a CPU
    return ServeProcess(["--engine", engine, "--http-port", "off", "--store", str(work / f"store-{name}"),
                         "--max-wait-ms", str(max_wait_ms), "--max-queue", "512", "--log-format", "text", *flags],
                        folder=work, name=f"serve-{name}", timeout=600)


def run(args: argparse.Namespace) -> int:
    if args.config:
        args.engine = str(cached_export(args.config, 256)[1])
    if args.arrival == "poisson":
        return run_poisson(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = new_report(args)
    if args.address:
        report["runs"].append({"server": args.address, **drive(args.address, args)})
    else:
        with tempfile.TemporaryDirectory(prefix="pixart-load-") as tmp:
            for mb in [int(x) for x in args.max_batch.split(",") if x.strip()]:
                server = start_server(args.engine, mb, args.max_wait_ms, Path(tmp))
                try:
                    report["runs"].append({"server": f"pixart serve --max-batch {mb}", "max_batch": mb,
                                           **drive(server.address, args)})
                finally:
                    server.stop()
    md = markdown(report)
    write_report(out_dir, "loadtest" + (f"-{args.tag}" if args.tag else ""), report, md)
    print(md)
    return 0


def new_report(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """A report's opening: when, the settings (the API key left out), the machine and versions; `extra` before
    the (empty) runs."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "key")},
        "machine": machine_info(),
        "versions": versions(),
        **extra,
        "runs": [],
    }


def markdown(report: dict) -> str:
    st = report["settings"]
    load = f"{st['requests']} requests" if st["requests"] else f"{st['duration']:g} s"
    lines = [
        f"# pixart loadtest: {st['clients']} clients, {load}, {st['size']}², {st['steps']} steps",
        "",
        "| server | done | errors | images/s | latency p50 / p90 / p99 (s) | queue p50 / p90 (s) "
        "| inference p50 / p90 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lat, q, inf = r["latency_s"], r["queue_s"], r["inference_s"]
        if lat["n"]:
            cells = (f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f}", f"{q['p50']:.2f} / {q['p90']:.2f}",
                     f"{inf['p50']:.2f} / {inf['p90']:.2f}")
        else:
            cells = ("–", "–", "–")
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        head = f"| {r['server']} | {r['completed']} | {errs} | {r['images_per_s']:.3f} | "
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- open loop ---------------------------------------------------------------------------------------------------

def schedule(rate: float, n: int, steps: list[int], sizes: list[tuple[int, int]], seed: int) -> list[dict]:
    """n arrivals with exponential gaps at `rate` per second, each with a step count and a size drawn uniformly."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    return [{"at": float(t), "steps": int(rng.choice(steps)), "size": sizes[int(rng.integers(len(sizes)))],
             "seed": i} for i, t in enumerate(times)]


def drive_open(address: str, arrivals: list[dict], key: str | None, timeout: float) -> dict:
    """Send each request at its arrival time (no waiting on earlier answers) and time them all."""
    import asyncio

    from server.client import AsyncClient, PixArtError

    async def main() -> tuple[list[dict], dict[str, int], float]:
        records, errors = [], {}
        async with AsyncClient(address, key, timeout=timeout) as client:
            start = time.perf_counter()

            async def one(a: dict) -> None:
                await asyncio.sleep(max(0.0, start + a["at"] - time.perf_counter()))
                t0 = time.perf_counter()
                try:
                    res = await client.generate(PROMPTS[a["seed"] % len(PROMPTS)], image_size=a["size"],
                                                num_inference_steps=a["steps"], seed=a["seed"])
                except PixArtError as e:
                    errors[e.code.name] = errors.get(e.code.name, 0) + 1
                    return
                records.append({"latency": time.perf_counter() - t0, "queue": res.timings.queue,
                                "steps": a["steps"], "images": len(res.images), "done": time.perf_counter() - start})

            await asyncio.gather(*(one(a) for a in arrivals))
        return records, errors, time.perf_counter() - start

    records, errors, wall = asyncio.run(main())
    first, last = arrivals[0]["at"], max((r["done"] for r in records), default=0.0)
    span = max(last - first, 1e-9)
    return {
        "completed": len(records), "errors": errors, "wall_s": wall,
        "images_per_s": sum(r["images"] for r in records) / span,
        "latency_s": percentiles([r["latency"] for r in records]),
        "queue_s": percentiles([r["queue"] for r in records]),
        "latency_by_steps": {str(s): percentiles([r["latency"] for r in records if r["steps"] == s])
                             for s in sorted({r["steps"] for r in records})},
    }


def measure_capacity(address: str, steps: list[int], sizes: list[tuple[int, int]], key: str | None,
                     timeout: float) -> dict:
    """Requests per second one at a time, over every (steps, size) of the mix, each once after a warm-up."""
    from server.client import Client

    mix = [(s, z) for s in steps for z in sizes]
    with Client(address, key, timeout=timeout) as client:
        client.generate(PROMPTS[0], image_size=sizes[0], num_inference_steps=1, seed=0)
        t0 = time.perf_counter()
        for n, (s, z) in enumerate(mix):
            client.generate(PROMPTS[n % len(PROMPTS)], image_size=z, num_inference_steps=s, seed=n)
        seconds = (time.perf_counter() - t0) / len(mix)
    return {"mean_service_s": seconds, "requests_per_s": 1.0 / seconds, "mix": [[s, list(z)] for s, z in mix]}


def run_poisson(args: argparse.Namespace) -> int:
    from engine.vocabulary import parse_image_size

    if not args.engine:
        raise SystemExit("--arrival poisson starts its own servers: give --engine or --config")
    steps = [int(s) for s in args.mix_steps.split(",")]
    sizes = [parse_image_size(s) for s in args.mix_sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    loads = [float(x) for x in args.loads.split(",")]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = new_report(args, modes={m: MODES[m] for m in modes})
    with tempfile.TemporaryDirectory(prefix="pixart-load-") as tmp:
        server = start_server(args.engine, 1, 0.0, Path(tmp), MODES["none"], "capacity")
        try:
            report["capacity"] = measure_capacity(server.address, steps, sizes, args.key, args.timeout)
        finally:
            server.stop()
        rate0 = report["capacity"]["requests_per_s"]
        print(f"capacity without batching: {rate0:.2f} requests/s", file=sys.stderr)
        if any("--step-cache" in MODES[m] for m in modes):  # what caching alone does to capacity
            server = start_server(args.engine, 1, 0.0, Path(tmp), CACHED_CAPACITY, "capacity-cached")
            try:
                report["capacity_step_cache"] = measure_capacity(server.address, steps, sizes, args.key,
                                                                 args.timeout)
            finally:
                server.stop()
            cached = report["capacity_step_cache"]["requests_per_s"]
            print(f"capacity without batching, step cache balanced: {cached:.2f} requests/s "
                  f"({cached / rate0:.2f}x)", file=sys.stderr)
        for mode in modes:
            server = start_server(args.engine, 1, args.max_wait_ms, Path(tmp), MODES[mode], mode)
            try:
                for load in loads:
                    arrivals = schedule(load * rate0, args.arrivals, steps, sizes, args.seed)
                    result = drive_open(server.address, arrivals, args.key, args.timeout)
                    report["runs"].append({"mode": mode, "load": load, "rate_per_s": load * rate0, **result})
                    lat = result["latency_s"]
                    print(f"{mode:>10} at {load:.0%}: p50 {lat.get('p50', 0):.2f} s, p99 {lat.get('p99', 0):.2f} s, "
                          f"{result['images_per_s']:.2f} images/s", file=sys.stderr)
            finally:
                server.stop()
    stem = "loadtest-poisson" + (f"-{args.tag}" if args.tag else "")
    md = markdown_poisson(report)
    write_report(out_dir, stem, report, md)
    plot_poisson(report, out_dir / f"{stem}.png")
    print(md)
    return 0


def markdown_poisson(report: dict) -> str:
    st, cap = report["settings"], report["capacity"]
    lines = [
        f"# pixart loadtest, Poisson arrivals: {st['arrivals']} requests per level, steps {{{st['mix_steps']}}}, "
        f"sizes {{{st['mix_sizes']}}}",
        "",
        f"Capacity without batching: {cap['requests_per_s']:.2f} requests/s "
        f"(mean service {cap['mean_service_s']:.2f} s)."
        + (f" With step cache `balanced`: {report['capacity_step_cache']['requests_per_s']:.2f} requests/s "
           f"({report['capacity_step_cache']['requests_per_s'] / cap['requests_per_s']:.2f}x)."
           if "capacity_step_cache" in report else ""),
        "",
        "| load | mode | latency p50 / p99 (s) | queue p50 / p99 (s) | images/s | errors |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(report["runs"], key=lambda r: (r["load"], list(report["modes"]).index(r["mode"]))):
        lat, q = r["latency_s"], r["queue_s"]
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {r['load']:.0%} | {r['mode']} | {lat.get('p50', 0):.2f} / {lat.get('p99', 0):.2f} | "
                     f"{q.get('p50', 0):.2f} / {q.get('p99', 0):.2f} | {r['images_per_s']:.2f} | {errs} |")
    return "\n".join(lines) + "\n"


def plot_poisson(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in report["modes"]:
        runs = sorted((r for r in report["runs"] if r["mode"] == mode), key=lambda r: r["load"])
        loads = [r["load"] * 100 for r in runs]
        axes[0].plot(loads, [r["latency_s"].get("p99", 0) for r in runs], marker="o", label=mode)
        axes[1].plot(loads, [r["images_per_s"] for r in runs], marker="o", label=mode)
    axes[0].set(xlabel="load (% of capacity without batching)", ylabel="p99 latency (s)", title="p99 latency")
    axes[1].set(xlabel="load (% of capacity without batching)", ylabel="images/s", title="throughput")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
