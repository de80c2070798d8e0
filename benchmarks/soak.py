"""A bounded soak: does a deployment leak under mixed traffic? `python -m benchmarks.soak --engine artifacts/default`

Two `pixart serve` replicas on one PostgreSQL (started here by pgserver) and a shared results folder take mixed
traffic for --minutes from a few client threads: gRPC Generate, durable Submit polled to its end, fal queue submits
over HTTP polled to their end, and Submits cancelled while they wait or run. After --warmup-minutes, and every
--sample-seconds until the end, it samples each replica's resident memory, open file descriptors and threads
(from /proc) and the database's connections, and reports each one's growth from the first sample to the last
(the target: at most 5% after warm-up). Errors by kind are counted, not raised: a soak reports, it does not stop.
Every request has a prompt of its own, so the replicas' cache of prompt embeddings grows to its bound by design (a
first 20-minute run with the default 256 MB bound grew 36-40% in resident memory at ~7.5 KB a prompt, which is that
cache filling); --text-cache-mb (default 2) keeps it small enough to fill during the warm-up, so that what grows
after it is what would leak. Figures go to benchmarks/results/soak.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common.machine import machine_info
from benchmarks.common.paths import RESULTS
from benchmarks.common.report import write_report
from benchmarks.common.serve import ServeProcess
from benchmarks.replicas import _new_database, _postgres

TERMINAL = ("COMPLETED", "FAILED", "CANCELED")
ACTIONS = ("generate", "submit", "fal", "cancel")


def process_sample(pid: int) -> dict[str, int]:
    """Resident memory (KiB), open file descriptors and threads of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_kib": int(status["VmRSS"].split()[0]), "open_files": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "threads": int(status["Threads"])}


def database_connections(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid()").fetchone()[0]


class Traffic:
    """Client threads that keep the replicas busy until `stop` is set; counts what they did and what failed."""

    def __init__(self, replicas: list[ServeProcess], steps: int, seed: int = 0):
        self.replicas, self.steps = replicas, steps
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def run(self, workers: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        return threads

    def _worker(self, index: int) -> None:
        from server.client import Client

        clients = [Client(r.address, timeout=120) for r in self.replicas]
        try:
            n = 0
            while not self.stop.is_set():
                with self._lock:
                    action = self._rng.choice(ACTIONS)
                    replica = self._rng.randrange(len(self.replicas))
                n += 1
                try:
                    getattr(self, f"_{action}")(clients[replica], self.replicas[replica], f"soak {index}-{n}")
                    with self._lock:
                        self.done[action] += 1
                except Exception as exc:  # counted and reported: a soak measures, it does not stop at the first
                    with self._lock:
                        self.errors[f"{action}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
        finally:
            for c in clients:
                c.close()

    def _work(self) -> dict:
        return {"num_inference_steps": self.steps, "image_size": (256, 256)}

    def _generate(self, client, replica, prompt: str) -> None:
        client.generate(prompt, **self._work())

    def _submit(self, client, replica, prompt: str) -> None:
        from protos.pixart.v1 import pixart_pb2 as pb

        rid = client.submit(prompt, **self._work())
        self._wait(lambda: pb.RequestState.Name(client.status(rid).state))

    def _cancel(self, client, replica, prompt: str) -> None:
        from protos.pixart.v1 import pixart_pb2 as pb

        rid = client.submit(prompt, num_inference_steps=50, image_size=(256, 256))
        time.sleep(self._rng.random() * 0.3)
        client.cancel(rid)
        self._wait(lambda: pb.RequestState.Name(client.status(rid).state))

    def _fal(self, client, replica, prompt: str) -> None:
        base = f"http://127.0.0.1:{replica.http_port}/queue/fal-ai/pixart-sigma"
        body = json.dumps({"prompt": prompt, "num_inference_steps": self.steps,
                           "image_size": {"width": 256, "height": 256}}).encode()
        request = urllib.request.Request(base, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            status_url = json.loads(resp.read())["status_url"]

        def state() -> str:
            with urllib.request.urlopen(status_url, timeout=60) as r:
                return json.loads(r.read())["status"]

        self._wait(state, done=("COMPLETED",))

    def _wait(self, state, done: tuple[str, ...] = TERMINAL, timeout: float = 300.0) -> None:
        end = time.monotonic() + timeout
        while (now := state()) not in done:
            if time.monotonic() > end:
                raise TimeoutError(f"still {now} after {timeout:.0f} s")
            time.sleep(0.1)


def soak(engine: str, minutes: float, warmup_minutes: float, sample_s: float, workers: int, steps: int,
         text_cache_mb: float = 2.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="pixart-soak-") as tmp:
        folder = Path(tmp)
        server, admin = _postgres(folder / "pg")
        url = _new_database(admin, "soak")
        replicas = [ServeProcess(["--engine", engine, "--store", url, "--results", str(folder / "results"),
                                  "--http-port", "0", "--replica-id", name, "--intra-op-threads", "1",
                                  "--text-cache-mb", str(text_cache_mb), "--no-warmup"], folder=folder, name=name)
                    for name in ("a", "b")]
        traffic = Traffic(replicas, steps)
        samples: list[dict] = []
        try:
            threads = traffic.run(workers)
            started = time.monotonic()
            time.sleep(warmup_minutes * 60)
            while True:
                samples.append({"t_s": round(time.monotonic() - started, 1),
                                "replicas": {r.proc.pid: process_sample(r.proc.pid) for r in replicas},
                                "database_connections": database_connections(url)})
                if time.monotonic() - started >= (warmup_minutes + minutes) * 60:
                    break
                time.sleep(sample_s)
            traffic.stop.set()
            for t in threads:
                t.join(300)
        finally:
            for r in replicas:
                r.stop(60)
            server.cleanup()
    return report(samples, traffic, minutes, warmup_minutes, workers, steps, text_cache_mb)


def growth(first: float, last: float) -> float:
    return (last - first) / first if first else 0.0


WINDOW = 5  # samples whose median is a start or an end: one sample swings by megabytes with the requests in flight


def per_replica(samples: list[dict]) -> dict:
    """Each replica's resources: start and end as medians of the first and last WINDOW samples, their growth, and
    the fitted trend per minute over the whole measured time."""
    out = {}
    for pid in samples[0]["replicas"]:
        minutes = np.array([s["t_s"] for s in samples]) / 60
        out[str(pid)] = {}
        for k in samples[0]["replicas"][pid]:
            values = np.array([s["replicas"][pid][k] for s in samples], dtype=float)
            a, b = float(np.median(values[:WINDOW])), float(np.median(values[-WINDOW:]))
            trend = float(np.polyfit(minutes, values, 1)[0]) if len(values) > 1 else 0.0
            out[str(pid)][k] = {"start": a, "end": b, "growth": round(growth(a, b), 4),
                                "per_minute": round(trend, 3)}
    return out


def report(samples: list[dict], traffic: Traffic, minutes: float, warmup: float, workers: int, steps: int,
           text_cache_mb: float) -> dict:
    first, last = samples[0], samples[-1]
    return {
        "settings": {"minutes": minutes, "warmup_minutes": warmup, "workers": workers, "steps": steps,
                     "text_cache_mb": text_cache_mb},
        "machine": machine_info(), "done": dict(traffic.done), "errors": dict(traffic.errors),
        "replicas": per_replica(samples),
        "database_connections": {"start": first["database_connections"], "end": last["database_connections"]},
        "samples": samples,
    }


def markdown(r: dict, command: str) -> str:
    s = r["settings"]
    lines = [f"# Soak: two replicas on PostgreSQL, {s['minutes']:g} min after {s['warmup_minutes']:g} min of "
             f"warm-up, {s['workers']} client threads, {s['steps']}-step requests, a prompt of its own each, "
             f"--text-cache-mb {s['text_cache_mb']:g}",
             "", f"Done: {', '.join(f'{k} {v}' for k, v in sorted(r['done'].items()))}; errors: "
             f"{sum(r['errors'].values())}" + "".join(f"\n- {k}: {v}" for k, v in r["errors"].items()), "",
             f"Start and end are medians of the first and last {WINDOW} samples; the trend is fitted over all.", "",
             "| replica | resident memory (KiB) | its trend | open files | threads |", "|---|---|---|---|---|"]
    for name, (pid, m) in zip("ab", r["replicas"].items(), strict=False):
        cells = [f"{m[k]['start']:.0f} → {m[k]['end']:.0f} ({m[k]['growth']:+.1%})"
                 for k in ("rss_kib", "open_files", "threads")]
        cells.insert(1, f"{m['rss_kib']['per_minute'] / 1024:+.2f} MB/min")
        lines.append(f"| {name} (pid {pid}) | " + " | ".join(cells) + " |")
    db = r["database_connections"]
    lines += ["", f"Database connections: {db['start']} → {db['end']}.", "", f"Made by `{command}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="artifacts/default", help="an export folder")
    p.add_argument("--minutes", type=float, default=20.0, help="how long to measure, after the warm-up")
    p.add_argument("--warmup-minutes", type=float, default=2.0)
    p.add_argument("--sample-seconds", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=3, help="client threads")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--text-cache-mb", type=float, default=2.0,
                   help="the replicas' prompt-embedding cache: small, so that it is full after the warm-up")
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)
    r = soak(a.engine, a.minutes, a.warmup_minutes, a.sample_seconds, a.workers, a.steps, a.text_cache_mb)
    command = (f"python -m benchmarks.soak --engine {a.engine} --minutes {a.minutes:g} --warmup-minutes "
               f"{a.warmup_minutes:g} --workers {a.workers} --steps {a.steps} --text-cache-mb {a.text_cache_mb:g}")
    print(write_report(Path(a.out_dir), "soak", r, markdown(r, command)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
