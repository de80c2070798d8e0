"""Schema-driven fuzzing of the HTTP port: schemathesis sends what /openapi.json allows and what it forbids, to every
route, and checks every answer: no 5xx, status codes, content types, headers and bodies as documented, schema-valid
input accepted, invalid input refused, missing keys refused.

    python -m benchmarks.fuzz_http --export artifacts/default --max-examples 200
    python -m benchmarks.fuzz_http --url http://127.0.0.1:8080 --key KEY    # a server you started

With `--export` it starts `pixart serve` on that export (SQLite store, one API key, every webhook destination
opened so that a schema-valid webhook URL is also one the policy accepts) and stops it afterwards. The suite runs the
same function with a few examples per operation (tests/server/integration/test_http_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).with_name("fuzz_http.toml")
# Every destination a webhook URL may name: the schema cannot say which addresses an operator opened
OPEN_WEBHOOKS = ["0.0.0.0/0", "::/0", "localhost"]


def fuzz(base_url: str, *, key: str | None, max_examples: int, seed: int, report: Path | None = None,
         phases: str = "examples,coverage,fuzzing,stateful", timeout_s: float = 60.0) -> tuple[int, str]:
    """Run schemathesis against `base_url`, every check enabled (its default; fuzz_http.toml lists the
    exceptions per route); (exit code, its output). 0: no failure found."""
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
               f"{base_url}/openapi.json", "--max-examples", str(max_examples),
               "--seed", str(seed), "--phases", phases, "--request-timeout", str(timeout_s),
               "--continue-on-failure", "--no-color"]
    if key:
        command += ["--header", f"Authorization: Key {key}"]
    if report is not None:
        command += ["--report", "junit", "--report-junit-path", str(report)]
    env = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    return done.returncode, done.stdout + done.stderr


def _serve(export: str, folder: Path, key: str) -> tuple[subprocess.Popen, str]:
    (folder / "keys").write_text(f"fuzz {key}\n")
    port_file = folder / "ports.json"
    command = [sys.executable, str(ROOT / "pixart_cli.py"), "serve", "--engine", export, "--port", "0",
               "--http-port", "0", "--store", str(folder / "store"), "--api-keys-file", str(folder / "keys"),
               "--no-warmup", "--max-queue", "1000", "--port-file", str(port_file), "--log-format", "text",
               "--log-level", "WARNING"]
    for entry in OPEN_WEBHOOKS:
        command += ["--webhook-allow", entry]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=(folder / "serve.log").open("w"))
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pixart serve did not start: {(folder / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return server, f"http://127.0.0.1:{json.loads(port_file.read_text())['http_port']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server's HTTP port")
    where.add_argument("--export", help="start `pixart serve` on this export folder")
    parser.add_argument("--key", help="API key to send (with --url)")
    parser.add_argument("--max-examples", type=int, default=100, help="examples per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="write a JUnit report here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pixart-fuzz-") as tmp:
        server = None
        key = args.key
        if args.export:
            key = secrets.token_urlsafe(24)
            server, url = _serve(args.export, Path(tmp), key)
        else:
            url = args.url.rstrip("/")
        try:
            code, output = fuzz(url, key=key, max_examples=args.max_examples, seed=args.seed, report=args.report)
        finally:
            if server is not None:
                server.terminate()
                server.wait(60)
    print(output)
    print(f"fuzz_http: schemathesis exit code {code} after {time.monotonic() - started:.0f} s "
          f"({args.max_examples} examples per operation, seed {args.seed})")
    return code


if __name__ == "__main__":
    sys.exit(main())
