"""Scale-out figures on this machine: `python -m benchmarks.replicas [--engine artifacts/default]`.

1. Throughput of 1, 2 and 3 `pixart serve` replicas on one PostgreSQL (started here by pgserver), with
   --intra-op-threads = cores // replicas so that they share the cores instead of oversubscribing them: a burst of
   durable submits spread over the replicas, timed until every request is COMPLETED.
2. The store's own cost per call, PostgreSQL against SQLite: what Submit adds (queue-depth check + insert, committed)
   and what Status reads (row + queue position), p50/p99 over many calls, no engine involved.
3. Claims per second a single PostgreSQL sustains: claimer threads that claim one request and finish it, as
   replicas do, on a pre-filled queue.
Figures are printed and written to benchmarks/results/replicas.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common.machine import machine_info
from benchmarks.common.paths import RESULTS, ROOT
from benchmarks.common.serve import ServeProcess

REQUEST = b"\x0a\x03cat" * 20  # about the size of a stored GenerateRequest


def _postgres(folder: Path) -> tuple[object, str]:
    import pgserver

    server = pgserver.get_server(folder, cleanup_mode="stop")
    return server, server.get_uri()


def _new_database(admin: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return admin.replace("/postgres?", f"/{name}?", 1)


def _serve(url: str, folder: Path, name: str, threads: int, engine: str) -> ServeProcess:
    return ServeProcess(["--engine", engine, "--store", url, "--results", str(folder / "results"), "--http-port", "off",
                         "--replica-id", name, "--intra-op-threads", str(threads), "--max-batch", "4",
                         "--max-batch-images", "4"], folder=folder, name=name)


def throughput(admin: str, folder: Path, replicas: int, requests: int, steps: int, size: int, engine: str) -> dict:
    from protos.pixart.v1 import pixart_pb2 as pb
    from server.client import Client

    cores = os.cpu_count() or 1
    threads = max(1, cores // replicas)
    url = _new_database(admin, f"bench_{replicas}")
    work = folder / f"replicas-{replicas}"
    work.mkdir()
    procs = [_serve(url, work, f"r{i}", threads, engine) for i in range(replicas)]
    clients = [Client(proc.address, timeout=60) for proc in procs]
    try:
        t0 = time.perf_counter()
        ids = [clients[i % replicas].submit(f"request {i}", seed=i, num_inference_steps=steps, image_size=(size, size))
               for i in range(requests)]
        pending = set(ids)
        while pending:
            pending = {rid for rid in pending if clients[0].status(rid).state != pb.COMPLETED}
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    return {"replicas": replicas, "intra_op_threads": threads, "requests": requests, "steps": steps, "size": size,
            "seconds": round(elapsed, 3), "requests_per_s": round(requests / elapsed, 3)}


def _percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def store_overhead(store, calls: int) -> dict:
    from server.storage import new_request_id

    submit, status, ids = [], [], []
    for _ in range(calls):
        rid = new_request_id()
        t0 = time.perf_counter()
        store.queued()  # Submit's queue-depth check, then the committed insert: what App.submit does
        store.add(rid, REQUEST)
        submit.append(time.perf_counter() - t0)
        ids.append(rid)
    for rid in ids:
        t0 = time.perf_counter()
        store.get(rid)  # Status of a request that runs elsewhere: its row and its place in the queue
        store.position(rid)
        status.append(time.perf_counter() - t0)
    return {"calls": calls, "submit": _percentiles(submit), "status": _percentiles(status)}


def claims_per_second(store, rows: int, claimers: int) -> dict:
    from server.storage import COMPLETED, new_request_id

    for _ in range(rows):
        store.add(new_request_id(), REQUEST)
    done = [0] * claimers

    def claimer(index: int) -> None:
        name = f"c{index}"
        while claimed := store.claim(name, 1, lease_s=60):
            store.finish(claimed[0].id, COMPLETED, request=REQUEST, owner=name, attempt=claimed[0].attempt)
            done[index] += 1

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"rows": rows, "claimers": claimers, "seconds": round(elapsed, 3),
            "claims_per_s": round(sum(done) / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=str(ROOT / "artifacts" / "default"), help="export folder to serve")
    p.add_argument("--replicas", default="1,2,3")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--calls", type=int, default=1000, help="store calls per overhead figure")
    p.add_argument("--claim-rows", type=int, default=3000)
    p.add_argument("--claimers", type=int, default=8)
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)

    from server.storage import SqliteStore, open_store

    folder = Path(tempfile.mkdtemp(prefix="pixart-bench-replicas-"))
    server, admin = _postgres(folder / "pg")
    try:
        report: dict = {"machine": machine_info(), "postgresql": "16 (pgserver, local socket, same machine)"}
        report["throughput"] = []
        for n in [int(x) for x in args.replicas.split(",")]:
            row = throughput(admin, folder, n, args.requests, args.steps, args.size, args.engine)
            print(json.dumps(row), flush=True)
            report["throughput"].append(row)
        sqlite = SqliteStore(folder / "sqlite")
        pg = open_store(_new_database(admin, "bench_overhead"), folder / "pg-results")
        report["store_overhead"] = {"sqlite": store_overhead(sqlite, args.calls),
                                    "postgresql": store_overhead(pg, args.calls)}
        print(json.dumps(report["store_overhead"]), flush=True)
        pg_claims = open_store(_new_database(admin, "bench_claims"), folder / "pg-results")
        report["claims"] = claims_per_second(pg_claims, args.claim_rows, args.claimers)
        print(json.dumps(report["claims"]), flush=True)
        for s in (sqlite, pg, pg_claims):
            s.close()
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| replicas | intra-op threads | requests | seconds | requests/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['replicas']} | {r['intra_op_threads']} | {r['requests']} | {r['seconds']} | "
              f"{r['requests_per_s']} |" for r in report["throughput"]]
    lines += ["", "| store | submit p50 ms | submit p99 ms | status p50 ms | status p99 ms |", "|---|---|---|---|---|"]
    for name, o in report["store_overhead"].items():
        lines.append(f"| {name} | {o['submit']['p50_ms']} | {o['submit']['p99_ms']} | {o['status']['p50_ms']} | "
                     f"{o['status']['p99_ms']} |")
    c = report["claims"]
    lines += ["", f"PostgreSQL claims (claim + finish, {c['claimers']} claimers): {c['claims_per_s']} per second"]
    (out / "replicas.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
