"""Real servers for the tests: the default export built once, in-process servers and `pixart serve` processes.

The engine export is built once per test session (`pixart export --out DIR`), or taken from PIXART_TEST_EXPORT
when that names an existing export folder, so that a developer can skip the build. Servers are real: gRPC on
loopback port 0, either in this process (on an event loop in a background thread, so tests can also look at
its parts) or as `python -m server.cli serve` subprocesses for SIGTERM and kill -9.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.common.serve import ServeProcess
from server.app import App
from server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
_lock = threading.Lock()
_export: Path | None = None
_engine: Any = None


def export_dir() -> Path:
    """The embedded default model's export, built at most once per session."""
    global _export
    with _lock:
        if _export is not None:
            return _export
        given = os.environ.get("PIXART_TEST_EXPORT")
        if given and (Path(given) / "manifest.json").exists():
            _export = Path(given)
            return _export
        tmp = Path(tempfile.mkdtemp(prefix="pixart-test-export-"))
        atexit.register(shutil.rmtree, tmp, True)
        out = tmp / "default"
        subprocess.run(
            [sys.executable, str(ROOT / "pixart_cli.py"), "export", "--out", str(out), "--safety-checker", "--quiet"],
            cwd=ROOT, check=True, capture_output=True, timeout=600,
        )
        _export = out
        return _export


def shared_engine() -> Any:
    """One loaded, warmed engine for all in-process servers of the session (they never run at once)."""
    global _engine
    path = export_dir()
    with _lock:
        if _engine is None:
            from engine import Engine

            _engine = Engine.load(path)
            _engine.warmup()
        return _engine


def config(store: Path, **kw: Any) -> ServerConfig:
    base = ServerConfig(engine=str(export_dir()), port=0, http_port=0, store=str(store), warmup=False,
                        grace_s=30.0)
    return replace(base, **kw)


class Borrowed:
    """An engine lent to one server of the session: everything but close(), which would take it from the others."""

    def __init__(self, engine: Any):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


class ServerThread:
    """An App on its own event loop in a daemon thread."""

    def __init__(self, cfg: ServerConfig, *, load: bool = True, engine: Any = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        loader = lambda _d, _p, **_o: Borrowed(engine if engine is not None else shared_engine())  # noqa: E731
        self.app: App = self.run(self._make(cfg, loader))
        if load:
            self.run(self.app.load_engine())

    @staticmethod
    async def _make(cfg: ServerConfig, loader: Any) -> App:
        app = App(cfg, engine_loader=loader)
        await app.start()
        return app

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def http_port(self) -> int:
        return self.app.http_port

    def wait_idle(self, timeout: float = 60) -> None:
        """Until nothing is queued or running (cancelled work has stopped)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.app.loop is None or (self.app.loop.scheduler.idle and not self.app.loop.scheduler.waiting):
                return
            time.sleep(0.02)
        raise TimeoutError("server did not become idle")

    def close(self) -> None:
        if not self.app.draining:
            self.run(self.app.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ServerProcess(ServeProcess):
    """`pixart serve` of the session's export on port 0 (gRPC and HTTP), without warm-up."""

    def __init__(self, store: Path | str, *args: str, env: dict | None = None, folder: Path | None = None):
        # folder: where its port file and log go (default beside a store folder; needed for a database URL)
        super().__init__(["--engine", str(export_dir()), "--http-port", "0", "--store", str(store), "--no-warmup",
                          *args], folder=Path(folder) if folder is not None else Path(store).parent, name="server",
                         env=env, timeout=120)


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def metrics_text(port: int, key: str | None = None) -> str:
    headers = {"Authorization": f"Key {key}"} if key else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
