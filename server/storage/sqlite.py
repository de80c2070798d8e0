"""The SQLite backend of the store (`--store DIR`, the embedded default): one process owns the folder, with the
database (requests.sqlite3, WAL, synchronous=FULL), the server's signing keys (*.key, mode 0600) and, unless
`--results` names another place, the result images (results/<request_id>/<file_name>)."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from .results import FolderResults, Results
from .sql import _ACTIVE, SchemaTooNew, SqlStore, StoreUnavailable

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
    (  # who submitted it: claims take turns, its key's limits count its requests
        "ALTER TABLE requests ADD COLUMN tenant TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX requests_tenant ON requests(tenant, created)",
    ),
)


class SqliteStore(SqlStore):
    """One process's store: a folder with the database, the keys and (by default) the result images.
    The connection is shared by the event loop's threads and the worker thread under one lock."""

    backend = "sqlite"
    SCHEMA_VERSION = len(_SQLITE_MIGRATIONS)

    def __init__(self, folder: str | Path, results: Results | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.results = results if results is not None else FolderResults(self.folder / "results")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.folder / "requests.sqlite3", check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged Submit must survive power loss too, not only a killed process
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SQLITE_SCHEMA)
        except sqlite3.OperationalError as exc:  # a read-only or full folder, a database locked past the timeout
            raise StoreUnavailable(f"the store's database in {self.folder} cannot be opened for writing: "
                                   f"{str(exc)[:200]} (is the folder writable, with space left?)") from exc
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
        """One transaction; a database locked by another process past the busy timeout, a read-only or vanished
        folder, a full disk become StoreUnavailable (nothing committed)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    self._db.rollback()
                    raise
                else:
                    self._db.commit()
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.rollback()
                raise StoreUnavailable(f"the store's database in {self.folder} cannot be written now: "
                                       f"{str(exc)[:200]}") from exc
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
