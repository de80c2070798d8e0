"""The PostgreSQL backend of the store (`--store postgresql://...`): many replicas on one database (psycopg 3 with
a connection pool).

Claims use `SELECT ... FOR UPDATE SKIP LOCKED`, so replicas claiming at the same moment take different rows and
never wait for each other; `finish` locks the row (`FOR UPDATE`) while it checks the claim and writes. Leases are
wall-clock deadlines (time.time() of the writer): replicas' clocks must agree to well within a lease (NTP does).
Migrations are versioned in table pixart_schema and applied under an advisory lock, so replicas starting together
migrate once; a database migrated by a newer server is refused with SchemaTooNew.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .results import Results
from .sql import SchemaTooNew, SqlStore, StoreUnavailable

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE requests (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT UNIQUE NOT NULL,
            state TEXT NOT NULL,
            durable INTEGER NOT NULL,
            request BYTEA NOT NULL,
            webhook_url TEXT NOT NULL DEFAULT '',
            webhook_done INTEGER NOT NULL DEFAULT 0,
            created DOUBLE PRECISION NOT NULL,
            started DOUBLE PRECISION,
            finished DOUBLE PRECISION,
            error BYTEA,
            result BYTEA,
            logs TEXT NOT NULL DEFAULT '[]',
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            origin TEXT NOT NULL DEFAULT 'grpc',
            owner TEXT,
            lease_until DOUBLE PRECISION,
            attempt INTEGER NOT NULL DEFAULT 0,
            progress_step INTEGER NOT NULL DEFAULT 0,
            progress_total INTEGER NOT NULL DEFAULT 0,
            webhook_owner TEXT,
            webhook_lease DOUBLE PRECISION
        )""",
        "CREATE INDEX requests_state ON requests(state)",
        "CREATE INDEX requests_owner ON requests(owner) WHERE owner IS NOT NULL",
        "CREATE INDEX requests_finished ON requests(finished) WHERE finished IS NOT NULL",
        # the claim scan: active durable rows in submission order
        "CREATE INDEX requests_active ON requests(seq) WHERE state IN ('IN_QUEUE', 'IN_PROGRESS') AND durable = 1",
        "CREATE INDEX requests_webhooks ON requests(seq) WHERE webhook_done = 0 AND webhook_url != ''",
        "CREATE TABLE secrets (name TEXT PRIMARY KEY, value BYTEA NOT NULL)",
    ),
    (  # who submitted it: claims take turns, its key's limits count its requests
        "ALTER TABLE requests ADD COLUMN tenant TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX requests_tenant ON requests(tenant, created)",
    ),
)
_LOCK_KEY = 0x70697861  # the advisory lock that serializes migrations ("pixa")
# While the database is away a call waits this long for a connection, then answers StoreUnavailable: callers hear
# UNAVAILABLE promptly instead of hanging until their deadline, and nothing they were not told about commits later.
CHECKOUT_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5


class PostgresStore(SqlStore):
    backend = "postgresql"
    SCHEMA_VERSION = len(_MIGRATIONS)
    _for_update = " FOR UPDATE"
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, results: Results, *, min_connections: int = 1, max_connections: int = 8):
        self.url = url
        self.results = results
        # the pool never logs or raises the URL (it carries the password); a bad one fails here, at startup
        # `check`: a connection is tested as it leaves the pool, so that the ones a database restart broke are
        # replaced there (the pool reconnects in the background, with backoff) instead of failing a caller each
        self._pool = ConnectionPool(url, min_size=min_connections, max_size=max_connections, open=False,
                                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
                                    timeout=CHECKOUT_TIMEOUT_S, check=ConnectionPool.check_connection,
                                    name="pixart-store")
        self._pool.open(wait=True, timeout=30)
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """One transaction; a database that is down, restarting or unreachable becomes StoreUnavailable."""
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable("the database cannot be reached now (down or restarting); retry later") from exc

    def schema_version(self) -> int:
        with self._tx() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS pixart_schema (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM pixart_schema")
            row = cur.fetchone()
            return row[0] if row else 0

    def _migrate(self) -> None:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute("CREATE TABLE IF NOT EXISTS pixart_schema (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM pixart_schema")
            row = cur.fetchone()
            version = row[0] if row else 0
            if version > self.SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the PostgreSQL store has schema version {version}, newer than this server's "
                    f"{self.SCHEMA_VERSION}: a newer server migrated it; run that version (or newer) here too"
                )
            for number in range(version, self.SCHEMA_VERSION):
                for statement in _MIGRATIONS[number]:
                    cur.execute(statement)
            if row is None:
                cur.execute("INSERT INTO pixart_schema (version) VALUES (%s)", (self.SCHEMA_VERSION,))
            elif version != self.SCHEMA_VERSION:
                cur.execute("UPDATE pixart_schema SET version = %s", (self.SCHEMA_VERSION,))

    def secret(self, name: str) -> bytes:
        """A random 32-byte key kept in the database, made by whichever replica asks first: all replicas sign
        (result URLs, webhooks) with the same key."""
        with self._tx() as cur:
            cur.execute("INSERT INTO secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                        (name, secrets.token_bytes(32)))
            cur.execute("SELECT value FROM secrets WHERE name = %s", (name,))
            return bytes(cur.fetchone()[0])

    def close(self) -> None:
        self._pool.close()
