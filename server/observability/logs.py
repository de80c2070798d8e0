"""Structured logs: one JSON object a line, with the request id (and other `extra=` fields) when there is one."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """At most one line per interval for an event a client can trigger at will, carrying how many it stands for."""

    def __init__(self, logger: logging.Logger, message: str, interval_s: float = 10.0):
        self.logger, self.message, self.interval_s = logger, message, interval_s
        self.next_at, self.pending = 0.0, 0
        self._lock = threading.Lock()

    def __call__(self, **extra: object) -> None:
        with self._lock:
            self.pending += 1
            now = time.monotonic()
            if now < self.next_at:
                return
            count, self.pending, self.next_at = self.pending, 0, now + self.interval_s
        self.logger.warning(self.message, extra={**extra, "count": count})
