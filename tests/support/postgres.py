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
