"""Opening the store and its results from what `--store` and `--results` say: the one place that knows every backend.

`--store`: a folder (SQLite, one process) or a postgresql:// URL (PostgreSQL, shared by replicas). `--results`: a
folder, or s3://bucket/prefix; by default <store>/results with SQLite, while PostgreSQL needs one every replica
shares. The backends that need an extra package (psycopg, boto3) are imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .results import FolderResults, Results
from .sql import SqlStore
from .sqlite import SqliteStore


def is_database_url(store: str | Path) -> bool:
    return str(store).startswith(("postgresql://", "postgres://"))


def is_s3_url(results: str | Path | None) -> bool:
    return isinstance(results, str) and results.startswith("s3://")


def open_results(results: str | Path | Results, **s3: Any) -> Results:
    """`--results`: a folder, or s3://bucket/prefix (`s3`: S3Results' endpoint_url, region); an opened one as is."""
    if not isinstance(results, (str, Path)):
        return results
    if is_s3_url(results):
        from .s3 import S3Results  # boto3 is needed only by those who ask for object storage

        return S3Results(str(results), **s3)
    return FolderResults(results)


def open_store(store: str | Path, results: str | Path | Results | None = None, *, s3: dict | None = None,
               **options: Any) -> SqlStore:
    """`--store` and `--results` opened. `s3`: options of an s3:// results location."""
    opened = open_results(results, **(s3 or {})) if results else None
    if is_database_url(store):
        if opened is None:
            raise ValueError("--results: a PostgreSQL store needs results that every replica shares (a folder or "
                             "s3://bucket/prefix)")
        from .postgres import PostgresStore  # psycopg is needed only by those who ask for PostgreSQL

        return PostgresStore(str(store), opened, **options)
    return SqliteStore(store, opened)
