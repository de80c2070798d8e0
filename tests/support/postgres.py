"""A real PostgreSQL for the tests, started by the test session itself (pgserver ships the server binaries; no
Docker). One server per session; each caller gets a fresh database of its own. Tests that need it skip, saying why,
only where the server cannot start here."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import uuid

import pytest

_lock = threading.Lock()
_server = None
_failure: str | None = None


def _admin_url() -> str:
    global _server, _failure
    with _lock:
        if _failure is not None:
            pytest.skip(_failure)
        if _server is None:
            try:
                import pgserver
            except ImportError:
                _failure = "PostgreSQL tests need pgserver (pip install -e '.[dev]')"
                pytest.skip(_failure)
            folder = tempfile.mkdtemp(prefix="pixart-pg-")
            try:
                _server = pgserver.get_server(folder, cleanup_mode="stop")
            except Exception as exc:  # no binaries for this platform, no shared memory...
                _failure = f"PostgreSQL could not start here: {type(exc).__name__}: {exc}"
                pytest.skip(_failure)
            atexit.register(shutil.rmtree, folder, True)
            atexit.register(_server.cleanup)
        return _server.get_uri()


def new_database() -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    import psycopg

    admin = _admin_url()
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin.replace("/postgres?", f"/{name}?", 1)


class OwnServer:
    """A PostgreSQL server of its own (not the session's), which a test may stop and start: an outage for the
    replicas on it alone."""

    def __init__(self) -> None:
        _admin_url()  # skips, saying why, where the session's server cannot start either
        import pgserver

        self.folder = tempfile.mkdtemp(prefix="pixart-pg-own-")
        self.server = pgserver.get_server(self.folder, cleanup_mode="stop")
        self.url = self.server.get_uri()

    def stop_immediately(self) -> None:
        """`pg_ctl stop -m immediate`: every backend killed at once, no shutdown checkpoint (a crash)."""
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "stop", "-m", "immediate"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def terminate_connections(self) -> int:
        """Kill every other connection server-side (`pg_terminate_backend`), as an administrator or a failover
        would; returns how many."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> "
                                    "pg_backend_pid() AND datname = current_database()").fetchall())

    def close(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.folder, ignore_errors=True)
