"""`pixart loadtest`: N concurrent gRPC clients against `pixart serve`, for a fixed duration or request count.

Per request it keeps the client-side latency and the server's own split (Timings.queue against the rest, which is
the engine's work), then reports p50/p90/p99, images/s and errors. Given --engine instead of --address it starts the
server itself, once per --max-batch value (default "1,4": batching off, then on), so both are measured in one run on
the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import PROMPTS, RESULTS, machine_info, versions

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--address", help="a running server, host:port")
    target.add_argument("--engine", help="an export folder: start `pixart serve` on it for each --max-batch")
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


def start_server(engine: str, max_batch: int, max_wait_ms: float, work: Path) -> tuple[subprocess.Popen, str]:
    """`pixart serve` on a free port, with its queue store in `work`; returns once it is accepting."""
    port_file = work / f"port-{max_batch}.json"
    log = open(work / f"serve-{max_batch}.log", "w")  # noqa: SIM115  (kept open for the server's lifetime)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--engine", engine, "--port", "0", "--metrics-port", "off",
         "--port-file", str(port_file), "--store", str(work / f"store-{max_batch}"), "--max-batch", str(max_batch),
         "--max-batch-images", str(max(max_batch, 8)), "--max-wait-ms", str(max_wait_ms), "--log-format", "text"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600  # a large model's warm-up can take minutes on a CPU
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"pixart serve did not start:\n{(work / f'serve-{max_batch}.log').read_text()[-3000:]}")
        time.sleep(0.2)
    port = json.loads(port_file.read_text())["port"]
    return proc, f"127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "key")},
        "machine": machine_info(),
        "versions": versions(),
        "runs": [],
    }
    if args.address:
        report["runs"].append({"server": args.address, **drive(args.address, args)})
    else:
        with tempfile.TemporaryDirectory(prefix="pixart-load-") as tmp:
            for mb in [int(x) for x in args.max_batch.split(",") if x.strip()]:
                proc, address = start_server(args.engine, mb, args.max_wait_ms, Path(tmp))
                try:
                    report["runs"].append({"server": f"pixart serve --max-batch {mb}", "max_batch": mb,
                                           **drive(address, args)})
                finally:
                    stop_server(proc)
    stem = "loadtest" + (f"-{args.tag}" if args.tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
