"""`pixart serve` in a child process on port 0, as the load and scale-out benchmarks and the server tests start it:
started, its ports read back from its --port-file once it serves, signalled, stopped, its log kept in a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .paths import ROOT


class ServeProcess:
    def __init__(self, args: list[str], *, folder: Path, name: str = "serve", env: dict[str, str] | None = None,
                 timeout: float = 180.0):
        """`args`: serve's flags (--engine, --store...); `folder`: where the port file and the log go. Returns once
        the server serves; raises RuntimeError with the log's tail when it exits or `timeout` passes first."""
        stamp = time.monotonic_ns()
        self.port_file = Path(folder) / f"{name}-{stamp}.port.json"
        self.log_path = Path(folder) / f"{name}-{stamp}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (lives as long as the process; closed in wait())
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--port-file", str(self.port_file), *args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path, **(env or {})})
        end = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise RuntimeError(f"pixart serve did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.port, self.http_port = ports["port"], ports["http_port"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the server drains), then SIGKILL if it has not exited within `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.close()
        self._log.close()

    def close(self) -> None:
        """SIGKILL, if it still runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait(30)
