"""The durable side of the queue, behind one interface with two backends, and where result images are kept.

SqliteStore (`--store DIR`, the embedded default): one process owns the folder: requests.sqlite3 (WAL), the
server's signing keys (*.key), and results/<request_id>/<file_name> unless `--results` names another folder.
PostgresStore (`--store postgresql://...`, server/pgstore.py): any number of replicas share one database; the
keys live in it, result images in the shared `--results` folder (a ReadWriteMany volume on Kubernetes).
Either keeps its images in a folder (FolderResults) or in S3-compatible object storage (`--results s3://bucket/prefix`,
S3Results in server/s3results.py); the rest of the server sees only the Results interface.

Both run the same SQL (written here with `?` placeholders) and keep the same promises:
- A Submit is acknowledged only after its row is committed, so a request the server said yes to survives kill -9;
  so is a Cancel (the flag is committed before the answer, and whoever runs or claims the request honours it).
- Work is claimed: a replica takes the oldest queued rows (locked rows are skipped, so two replicas never take the
  same one), stamping its name, a lease deadline and a new attempt number. It renews the lease while it works; a
  replica that dies stops renewing, and once the lease has run out another replica claims the row again.
- A request completes once: `finish` locks the row and writes only when the caller still holds the claim it was
  given (same owner, same attempt) and the row has not ended, so the late result of a replica that lost its lease
  is refused. Files are written under that lock, before the row points at them: a COMPLETED row never names a
  missing file, and a refused finisher never overwrites the winner's files.
- A webhook is delivered by whoever claims its delivery (the same lease idea), once per completion, with the
  request id as Idempotency-Key.
Schema changes are versioned migrations applied at open; a database newer than the server is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .states import TERMINAL, State

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELED = (State.IN_QUEUE.value, State.IN_PROGRESS.value,
                                                      State.COMPLETED.value, State.FAILED.value, State.CANCELED.value)

_COLUMNS = ("id, state, durable, request, webhook_url, webhook_done, created, started, finished, error, result, logs, "
            "cancel_requested, origin, owner, attempt, progress_step, progress_total, seq")
_ACTIVE = f"state IN ('{IN_QUEUE}', '{IN_PROGRESS}')"
_ENDED = "state IN ({})".format(", ".join(f"'{s.value}'" for s in TERMINAL))

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


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server than this one."""


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
    cancel_requested: bool = False  # a Cancel arrived while it was queued or ran: it must not run (again)
    origin: str = "grpc"  # the API it came through ("grpc" or "fal"): the shape of its webhook
    owner: str | None = None  # the replica holding its claim
    attempt: int = 0  # how many times it was claimed: the fencing token of the current claim
    progress: tuple[int, int] = (0, 0)  # (step, total steps), as its runner last reported
    seq: int = 0


class Results(Protocol):
    """Where result images are kept. Every method refuses (None, or ValueError for write) a request id that is not
    of the issued format and a file name the engine would not make, before it touches storage."""

    def write(self, request_id: str, images: Sequence[tuple[str, bytes]]) -> None:
        """Each image atomically (a reader sees all of it or none); raises if one cannot be written."""

    def read(self, request_id: str, file_name: str) -> bytes | None: ...

    def url(self, request_id: str, file_name: str, ttl_s: float) -> str | None:
        """A URL of the storage itself that clients may fetch for ttl_s, or None: the server serves the file."""

    def path(self, request_id: str, file_name: str) -> Path | None:
        """A local file the server can send, or None (none there, or not kept in a filesystem)."""

    def delete(self, request_id: str) -> None: ...


class FolderResults:
    """Result images in a folder, one sub-folder per request: local, or shared by replicas (NFS, RWX volume)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, request_id: str, images: Sequence[tuple[str, bytes]]) -> None:
        """Each file atomically (a reader sees all of it or none)."""
        if not is_request_id(request_id):
            raise ValueError("result folders are named by issued request ids only")
        folder = self.root / request_id
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in images:
            if not is_result_file(name):
                raise ValueError("result file names must be image_<index>.<png|jpg|webp>")
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)

    def path(self, request_id: str, file_name: str) -> Path | None:
        """The file of a stored image, or None. Only an id of the issued format and an engine-made file name are
        looked at, and the path must resolve inside that request's own folder (no links out)."""
        if not (is_request_id(request_id) and is_result_file(file_name)):
            return None
        folder = (self.root / request_id).resolve()
        path = (folder / file_name).resolve()
        if path.parent != folder or not folder.is_relative_to(self.root.resolve()) or not path.is_file():
            return None
        return path

    def read(self, request_id: str, file_name: str) -> bytes | None:
        path = self.path(request_id, file_name)
        return path.read_bytes() if path is not None else None

    def url(self, request_id: str, file_name: str, ttl_s: float) -> str | None:
        return None  # a folder has no URL of its own: the server signs and serves /results/...

    def delete(self, request_id: str) -> None:
        if is_request_id(request_id):
            shutil.rmtree(self.root / request_id, ignore_errors=True)


class SqlStore:
    """What both backends share: every statement, written once. Subclasses supply connections and dialect."""

    backend = "sql"
    _for_update = ""  # row locks, where the database has them (SQLite locks the whole file instead)
    _skip_locked = ""
    SCHEMA_VERSION = 0
    results: Results

    # -- what a backend provides ----------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """A cursor inside one transaction that takes the write lock at once (committed on a clean exit)."""
        raise NotImplementedError

    def _query(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._tx() as cur:
            cur.execute(self._sql(sql), tuple(args))
            return cur.fetchall() if cur.description else []

    def _update(self, sql: str, args: Sequence = ()) -> int:
        with self._tx() as cur:
            cur.execute(self._sql(sql), tuple(args))
            return cur.rowcount

    def secret(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def schema_version(self) -> int:
        raise NotImplementedError

    # -- submitting and looking ------------------------------------------------------------------------------
    def add(self, request_id: str, request: bytes, webhook_url: str = "", origin: str = "grpc") -> None:
        """Record an accepted Submit (committed before returning)."""
        self._update(
            "INSERT INTO requests (id, state, durable, request, webhook_url, created, origin) "
            "VALUES (?, ?, 1, ?, ?, ?, ?)",
            (request_id, IN_QUEUE, request, webhook_url, time.time(), origin),
        )

    def delete(self, request_id: str) -> None:
        self._update("DELETE FROM requests WHERE id = ?", (request_id,))
        self.results.delete(request_id)

    def get(self, request_id: str) -> Row | None:
        if not is_request_id(request_id):
            return None
        rows = self._query(f"SELECT {_COLUMNS} FROM requests WHERE id = ?", (request_id,))
        return _row(rows[0]) if rows else None

    def queued(self) -> int:
        """Requests waiting, claimed or not: the queue depth every replica sees."""
        return self._query(f"SELECT count(*) FROM requests WHERE state = '{IN_QUEUE}'")[0][0]

    def position(self, request_id: str) -> int:
        """How many queued requests are ahead of this one (0: next)."""
        rows = self._query(
            f"SELECT count(*) FROM requests WHERE state = '{IN_QUEUE}' AND seq < "
            "(SELECT seq FROM requests WHERE id = ?)", (request_id,))
        return rows[0][0] if rows else 0

    def image_path(self, request_id: str, file_name: str) -> Path | None:
        return self.results.path(request_id, file_name)

    def image_bytes(self, request_id: str, file_name: str) -> bytes | None:
        return self.results.read(request_id, file_name)

    # -- claims ---------------------------------------------------------------------------------------------
    def claim(self, owner: str, limit: int, lease_s: float, now: float | None = None) -> list[Row]:
        """Take up to `limit` of the oldest durable requests nobody holds (never claimed, handed back, or whose
        holder's lease ran out), oldest first. Rows another replica is claiming right now are skipped."""
        if limit <= 0:
            return []
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute(self._sql(
                f"SELECT seq FROM requests WHERE {_ACTIVE} AND durable = 1 "
                "AND (owner IS NULL OR lease_until < ?) ORDER BY seq LIMIT ?" + self._skip_locked), (now, limit))
            seqs = [r[0] for r in cur.fetchall()]
            if not seqs:
                return []
            cur.execute(self._sql(
                f"UPDATE requests SET owner = ?, lease_until = ?, attempt = attempt + 1 "
                f"WHERE seq IN ({', '.join('?' * len(seqs))}) RETURNING {_COLUMNS}"), (owner, now + lease_s, *seqs))
            rows = [_row(r) for r in cur.fetchall()]
        return sorted(rows, key=lambda r: r.seq)

    def renew(self, owner: str, lease_s: float, progress: dict[str, tuple[int, int]] | None = None,
              now: float | None = None) -> tuple[set[str], set[str]]:
        """Extend the lease of every unfinished request this owner holds and record their progress; returns
        (ids still held, those of them with a Cancel requested)."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute(self._sql(f"UPDATE requests SET lease_until = ? WHERE owner = ? AND {_ACTIVE} "
                                  "RETURNING id, cancel_requested"), (now + lease_s, owner))
            rows = cur.fetchall()
            if progress:
                cur.executemany(self._sql("UPDATE requests SET progress_step = ?, progress_total = ? "
                                          "WHERE id = ? AND owner = ?"),
                                [(step, total, rid, owner) for rid, (step, total) in progress.items()])
        return {r[0] for r in rows}, {r[0] for r in rows if r[1]}

    def release(self, owner: str, ids: Sequence[str] | None = None) -> int:
        """Hand claims back (all of this owner's unfinished ones, or those ids) for any replica to take now;
        a request that had started keeps IN_PROGRESS, so that its next runner knows it is a re-run."""
        sql = f"UPDATE requests SET owner = NULL, lease_until = NULL WHERE owner = ? AND {_ACTIVE}"
        if ids is None:
            return self._update(sql, (owner,))
        if not ids:
            return 0
        return self._update(sql + f" AND id IN ({', '.join('?' * len(ids))})", (owner, *ids))

    def set_running(self, request_id: str, owner: str, attempt: int) -> bool:
        return self._update(
            f"UPDATE requests SET state = ?, started = ?, progress_step = 0 WHERE id = ? AND owner = ? "
            f"AND attempt = ? AND {_ACTIVE}", (IN_PROGRESS, time.time(), request_id, owner, attempt)) > 0

    def request_cancel(self, request_id: str) -> bool:
        """Record a Cancel of a queued or running request (committed before returning); False if it had ended."""
        return self._update(f"UPDATE requests SET cancel_requested = 1 WHERE id = ? AND {_ACTIVE}",
                            (request_id,)) > 0

    def cancel_queued(self, request_id: str, logs: list | None = None) -> bool:
        """End a queued request that no replica holds; False when one does (it sees the cancel flag instead)."""
        now = time.time()
        return self._update(
            "UPDATE requests SET state = ?, finished = ?, logs = ? "
            f"WHERE id = ? AND state = '{IN_QUEUE}' AND (owner IS NULL OR lease_until < ?)",
            (CANCELED, now, json.dumps(logs or []), request_id, now)) > 0

    def finish(
        self,
        request_id: str,
        state: str,
        *,
        request: bytes,
        owner: str | None = None,
        attempt: int = 0,
        result: bytes | None = None,
        images: Sequence[tuple[str, bytes]] = (),
        error: bytes | None = None,
        logs: list | None = None,
    ) -> bool:
        """Record the end of a request. With `owner`: only if that claim (owner, attempt) still holds the unfinished
        row, else False (refused: another replica took it over, or it ended). Without: a request that was never
        stored (a unary call whose images must be served by URL) gets its row. Image files are written, atomically
        each, under the row's lock and before the row points at them."""
        now = time.time()
        with self._tx() as cur:
            if owner is not None:
                cur.execute(self._sql(f"SELECT owner, attempt, state FROM requests WHERE id = ?{self._for_update}"),
                            (request_id,))
                found = cur.fetchone()
                if found is None or found[0] != owner or found[1] != attempt or found[2] in TERMINAL:
                    return False
            if images:
                self.results.write(request_id, images)
            cur.execute(self._sql(
                """INSERT INTO requests (id, state, durable, request, created, finished, error, result, logs)
                   VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET state = excluded.state, finished = excluded.finished,
                       error = excluded.error, result = excluded.result, logs = excluded.logs,
                       lease_until = NULL"""),
                (request_id, state, request, now, now, error, result, json.dumps(logs or [])),
            )
        return True

    # -- webhooks -------------------------------------------------------------------------------------------
    def pending_webhooks(self, now: float | None = None) -> list[Row]:
        """Ended requests whose webhook nobody has delivered or is delivering (a dead deliverer's lease ran out)."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM requests WHERE {_ENDED} AND webhook_url != '' AND webhook_done = 0 "
            "AND (webhook_lease IS NULL OR webhook_lease < ?) ORDER BY seq",
            (time.time() if now is None else now,),
        )
        return [_row(r) for r in rows]

    def claim_webhook(self, request_id: str, owner: str, lease_s: float) -> bool:
        """Take the delivery of an ended request's webhook; False when done, or held by a live deliverer."""
        now = time.time()
        return self._update(
            "UPDATE requests SET webhook_owner = ?, webhook_lease = ? WHERE id = ? AND webhook_done = 0 "
            f"AND {_ENDED} AND (webhook_lease IS NULL OR webhook_lease < ? OR webhook_owner = ?)",
            (owner, now + lease_s, request_id, now, owner)) > 0

    def mark_webhook_done(self, request_id: str) -> None:
        self._update("UPDATE requests SET webhook_done = 1 WHERE id = ?", (request_id,))

    def expire(self, ttl_s: float, now: float | None = None) -> int:
        """Forget requests that ended more than ttl_s ago, files included; return how many."""
        cutoff = (now if now is not None else time.time()) - ttl_s
        ids = [r[0] for r in self._query("DELETE FROM requests WHERE finished IS NOT NULL AND finished < ? "
                                         "RETURNING id", (cutoff,))]
        for request_id in ids:
            self.results.delete(request_id)
        return len(ids)


_SQLITE_SCHEMA = """
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
_SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("ALTER TABLE requests ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",),
    ("ALTER TABLE requests ADD COLUMN origin TEXT NOT NULL DEFAULT 'grpc'",),  # which API's webhook payload it gets
    (  # claims and leases (one schema for both backends), progress for Status, webhook delivery claims
        "ALTER TABLE requests ADD COLUMN owner TEXT",
        "ALTER TABLE requests ADD COLUMN lease_until REAL",
        "ALTER TABLE requests ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN progress_step INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN progress_total INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN webhook_owner TEXT",
        "ALTER TABLE requests ADD COLUMN webhook_lease REAL",
    ),
)


class SqliteStore(SqlStore):
    """One process's store: a folder with the database, the keys and (by default) the result images.
    The connection is shared by the event loop's threads and the worker thread under one lock."""

    backend = "sqlite"
    SCHEMA_VERSION = len(_SQLITE_MIGRATIONS)

    def __init__(self, folder: str | Path, results: str | Path | Results | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.results = open_results(results if results is not None else self.folder / "results")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.folder / "requests.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged Submit must survive power loss too, not only a killed process
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SQLITE_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > self.SCHEMA_VERSION:
            raise SchemaTooNew(
                f"store {self.folder} has schema version {version}, newer than this server's {self.SCHEMA_VERSION}; "
                "run a newer server or point --store elsewhere"
            )
        for number in range(version, self.SCHEMA_VERSION):
            with self._db:  # each migration and its version bump commit together
                self._db.execute("BEGIN")
                for statement in _SQLITE_MIGRATIONS[number]:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                self._db.rollback()
                raise
            else:
                self._db.commit()
            finally:
                cur.close()

    def forget_claims(self) -> None:
        """At startup: the folder has one process, so claims left in it belong to a process that is gone."""
        self._update(f"UPDATE requests SET owner = NULL, lease_until = NULL, webhook_lease = NULL WHERE {_ACTIVE} "
                     "OR webhook_done = 0")

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


def is_database_url(store: str) -> bool:
    return str(store).startswith(("postgresql://", "postgres://"))


def open_results(results: str | Path | Results, **s3: Any) -> Results:
    """`--results`: a folder, or s3://bucket/prefix (`s3`: S3Results' endpoint_url, region); an opened one as is."""
    if not isinstance(results, (str, Path)):
        return results
    if str(results).startswith("s3://"):
        from .s3results import S3Results  # boto3 is needed only by those who ask for object storage

        return S3Results(str(results), **s3)
    return FolderResults(results)


def open_store(store: str | Path, results: str | Path | Results | None = None, *, s3: dict | None = None,
               **options: Any) -> SqlStore:
    """`--store`: a folder (SQLite) or a postgresql:// URL (results then need a shared `--results`: a folder every
    replica mounts, or s3://). `s3`: options of an s3:// results location."""
    opened = open_results(results, **(s3 or {})) if results else None
    if is_database_url(str(store)):
        if opened is None:
            raise ValueError("--results: a PostgreSQL store needs results that every replica shares (a folder or "
                             "s3://bucket/prefix)")
        from .pgstore import PostgresStore  # psycopg is needed only by those who ask for PostgreSQL

        return PostgresStore(str(store), opened, **options)
    return SqliteStore(store, opened)


def _row(r: tuple) -> Row:
    return Row(
        id=r[0], state=r[1], durable=bool(r[2]), request=bytes(r[3]), webhook_url=r[4], webhook_done=bool(r[5]),
        created=r[6], started=r[7], finished=r[8], error=None if r[9] is None else bytes(r[9]),
        result=None if r[10] is None else bytes(r[10]), logs=json.loads(r[11] or "[]"),
        cancel_requested=bool(r[12]), origin=r[13], owner=r[14], attempt=r[15], progress=(r[16], r[17]), seq=r[18],
    )
