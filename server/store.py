"""The durable side of the queue: request states in SQLite (WAL), result images as files beside the database.

Layout of a store folder:  requests.sqlite3 (+ -wal, -shm), results/<request_id>/<file_name>, and the server's
signing keys (*.key). Only files under results/ are ever served, and only those a stored request names.
A Submit is acknowledged only after its row is committed, so a request the server said yes to survives kill -9;
so is a Cancel of a running request (the flag is committed before the answer, and a restart honours it).
Files are written before the row that points at them, so a COMPLETED row never names a missing file.
The connection is shared by the event loop and the worker thread under one lock; every statement is short.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .states import TERMINAL, State

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELED = (State.IN_QUEUE.value, State.IN_PROGRESS.value,
                                                      State.COMPLETED.value, State.FAILED.value, State.CANCELED.value)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    durable INTEGER NOT NULL,
    request BLOB NOT NULL,
    webhook_url TEXT NOT NULL DEFAULT '',
    webhook_done INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error BLOB,
    result BLOB,
    logs TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
"""
# Versioned changes to a store written by an older server, applied in order at open (PRAGMA user_version).
_MIGRATIONS = (
    "ALTER TABLE requests ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE requests ADD COLUMN origin TEXT NOT NULL DEFAULT 'grpc'",  # which API's webhook payload it gets
)
SCHEMA_VERSION = len(_MIGRATIONS)
_COLUMNS = ("id, state, durable, request, webhook_url, webhook_done, created, started, finished, error, result, logs, "
            "cancel_requested, origin")

# Request ids are exactly what new_request_id() makes; anything else is refused before it reaches a query or a path.
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
# Result files are exactly what the engine names them: image_<index>.<extension>.
_RESULT_FILE = re.compile(r"image_[0-9]{1,2}\.(?:png|jpg|webp)")


def new_request_id() -> str:
    return uuid.uuid4().hex


def is_request_id(value: str) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def is_result_file(value: str) -> bool:
    return isinstance(value, str) and _RESULT_FILE.fullmatch(value) is not None


@dataclass
class Row:
    id: str
    state: str
    durable: bool
    request: bytes  # a serialized pixart.v1.GenerateRequest
    webhook_url: str
    webhook_done: bool
    created: float
    started: float | None
    finished: float | None
    error: bytes | None  # a serialized google.rpc.Status
    result: bytes | None  # a serialized pixart.v1.GenerateResult without file_data or url
    logs: list
    cancel_requested: bool = False  # a Cancel arrived while it ran: it must not run again after a restart
    origin: str = "grpc"  # the API it came through ("grpc" or "fal"): the shape of its webhook


class Store:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.results = self.folder / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.folder / "requests.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged Submit must survive power loss too, not only a killed process
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"store {self.folder} has schema version {version}, newer than this server's {SCHEMA_VERSION}; "
                "run a newer server or point --store elsewhere"
            )
        for number in range(version, SCHEMA_VERSION):
            with self._db:  # each migration and its version bump commit together
                self._db.execute("BEGIN")
                self._db.execute(_MIGRATIONS[number])
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    def secret(self, name: str) -> bytes:
        """A random 32-byte key kept in the store folder (mode 0600), made on first use: it outlives restarts."""
        path = self.folder / f"{name}.key"
        try:
            return bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex())
        try:
            os.link(tmp, path)  # first writer wins, so that every process of this store shares one key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return bytes.fromhex(path.read_text().strip())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add(self, request_id: str, request: bytes, webhook_url: str = "", origin: str = "grpc") -> None:
        """Record an accepted Submit (committed before returning)."""
        self._exec(
            "INSERT INTO requests (id, state, durable, request, webhook_url, created, origin) "
            "VALUES (?, ?, 1, ?, ?, ?, ?)",
            (request_id, IN_QUEUE, request, webhook_url, time.time(), origin),
        )

    def delete(self, request_id: str) -> None:
        self._exec("DELETE FROM requests WHERE id = ?", (request_id,))
        shutil.rmtree(self.results / request_id, ignore_errors=True)

    def set_running(self, request_id: str) -> None:
        self._exec(
            "UPDATE requests SET state = ?, started = ? WHERE id = ? AND state = ?",
            (IN_PROGRESS, time.time(), request_id, IN_QUEUE),
        )

    def request_cancel(self, request_id: str) -> bool:
        """Record a Cancel of a queued or running request (committed before returning); False if it had ended."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE requests SET cancel_requested = 1 WHERE id = ? AND state IN (?, ?)",
                (request_id, IN_QUEUE, IN_PROGRESS),
            )
            return cur.rowcount > 0

    def requeue(self, request_id: str) -> None:
        """A request that was running when the server died goes back to the queue."""
        self._exec("UPDATE requests SET state = ?, started = NULL WHERE id = ?", (IN_QUEUE, request_id))

    def finish(
        self,
        request_id: str,
        state: str,
        *,
        request: bytes,
        result: bytes | None = None,
        images: list[tuple[str, bytes]] = (),
        error: bytes | None = None,
        logs: list | None = None,
    ) -> None:
        """Record the end of a request (inserting a row for one that was never stored, e.g. a unary call whose
        images must be served by URL). Image files are written, atomically each, before the row points at them."""
        if images:
            folder = self.results / request_id
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in images:
                if not is_result_file(name):
                    raise ValueError("result file names must be image_<index>.<png|jpg|webp>")
                tmp = folder / f".{name}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, folder / name)
        now = time.time()
        self._exec(
            """INSERT INTO requests (id, state, durable, request, created, finished, error, result, logs)
               VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET state = excluded.state, finished = excluded.finished,
                   error = excluded.error, result = excluded.result, logs = excluded.logs""",
            (request_id, state, request, now, now, error, result, json.dumps(logs or [])),
        )

    def get(self, request_id: str) -> Row | None:
        if not is_request_id(request_id):
            return None
        rows = self._exec(f"SELECT {_COLUMNS} FROM requests WHERE id = ?", (request_id,))
        return _row(rows[0]) if rows else None

    def unfinished(self) -> list[Row]:
        """Durable requests that were queued or running when the server last stopped, oldest first."""
        rows = self._exec(
            f"SELECT {_COLUMNS} FROM requests WHERE state IN (?, ?) AND durable = 1 ORDER BY seq",
            (IN_QUEUE, IN_PROGRESS),
        )
        return [_row(r) for r in rows]

    def pending_webhooks(self) -> list[Row]:
        rows = self._exec(
            f"SELECT {_COLUMNS} FROM requests WHERE state IN (?, ?, ?) AND webhook_url != '' AND webhook_done = 0 "
            "ORDER BY seq",
            TERMINAL,
        )
        return [_row(r) for r in rows]

    def mark_webhook_done(self, request_id: str) -> None:
        self._exec("UPDATE requests SET webhook_done = 1 WHERE id = ?", (request_id,))

    def image_path(self, request_id: str, file_name: str) -> Path | None:
        """The file of a stored image, or None. Only an id of the issued format and an engine-made file name are
        looked at, and the path must resolve inside that request's own folder (no links out)."""
        if not (is_request_id(request_id) and is_result_file(file_name)):
            return None
        folder = (self.results / request_id).resolve()
        path = (folder / file_name).resolve()
        if path.parent != folder or not folder.is_relative_to(self.results.resolve()) or not path.is_file():
            return None
        return path

    def expire(self, ttl_s: float, now: float | None = None) -> int:
        """Forget requests that ended more than ttl_s ago, files included; return how many."""
        cutoff = (now if now is not None else time.time()) - ttl_s
        ids = [r[0] for r in self._exec("SELECT id FROM requests WHERE finished IS NOT NULL AND finished < ?",
                                         (cutoff,))]
        for request_id in ids:
            self.delete(request_id)
        return len(ids)


def _row(r: tuple) -> Row:
    return Row(
        id=r[0], state=r[1], durable=bool(r[2]), request=r[3], webhook_url=r[4], webhook_done=bool(r[5]),
        created=r[6], started=r[7], finished=r[8], error=r[9], result=r[10], logs=json.loads(r[11] or "[]"),
        cancel_requested=bool(r[12]), origin=r[13],
    )
