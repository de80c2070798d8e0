"""What both store backends share: the requests table's rows, every statement (written once, with `?`
placeholders), and the promises they keep.

SqliteStore (`--store DIR`, the embedded default, server/storage/sqlite.py): one process owns the folder:
requests.sqlite3 (WAL), the server's signing keys (*.key), and results/<request_id>/<file_name> unless `--results`
names another folder. PostgresStore (`--store postgresql://...`, server/storage/postgres.py): any number of
replicas share one database; the keys live in it, result images in the shared `--results` folder (a ReadWriteMany
volume on Kubernetes) or in S3-compatible object storage (server/storage/s3.py).

Both keep the same promises:
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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ids import is_request_id
from .results import Results
from .states import CANCELED, IN_PROGRESS, IN_QUEUE, TERMINAL

_COLUMNS = ("id, state, durable, request, webhook_url, webhook_done, created, started, finished, error, result, logs, "
            "cancel_requested, origin, owner, attempt, progress_step, progress_total, seq, tenant")
_ACTIVE = f"state IN ('{IN_QUEUE}', '{IN_PROGRESS}')"
_ENDED = "state IN ({})".format(", ".join(f"'{s.value}'" for s in TERMINAL))


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server than this one."""


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or written now (the database is down or restarting, its file is locked by
    another process, its folder is read-only): nothing was committed, and the call may be retried later. The message
    says which, briefly (never a connection URL)."""


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
    tenant: str = ""  # the name of the API key that submitted it ("" without keys)



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

    def forget_claims(self) -> None:
        """At startup. A store shared by replicas keeps every claim (a dead holder's lease runs out); a store one
        process owns forgets the claims left in it, which belonged to a process that is gone."""

    # -- submitting and looking ------------------------------------------------------------------------------
    def add(self, request_id: str, request: bytes, webhook_url: str = "", origin: str = "grpc",
            tenant: str = "") -> None:
        """Record an accepted Submit (committed before returning)."""
        self._update(
            "INSERT INTO requests (id, state, durable, request, webhook_url, created, origin, tenant) "
            "VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
            (request_id, IN_QUEUE, request, webhook_url, time.time(), origin, tenant),
        )

    def tenant_load(self, tenant: str, since: float) -> tuple[int, int]:
        """(durable requests of `tenant` queued or running, and submitted at or after `since`), across every
        replica sharing this store: what its key's limits are checked against."""
        (row,) = self._query(f"SELECT COALESCE(SUM(CASE WHEN {_ACTIVE} THEN 1 ELSE 0 END), 0), "
                             "COALESCE(SUM(CASE WHEN created >= ? THEN 1 ELSE 0 END), 0) FROM requests "
                             "WHERE tenant = ? AND durable = 1", (since, tenant))
        return int(row[0]), int(row[1])

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
        """Take up to `limit` of the durable requests nobody holds (never claimed, handed back, or whose holder's
        lease ran out): tenants take turns, each tenant's oldest first, so that one tenant's burst does not fill
        every replica ahead of another tenant's request. Rows another replica is claiming right now are skipped."""
        if limit <= 0:
            return []
        now = time.time() if now is None else now
        with self._tx() as cur:
            # The claimable test is repeated outside the subquery: PostgreSQL re-checks the outer WHERE on a row
            # another claimer updated before this one could lock it, so a row claimed meanwhile is skipped
            claimable = f"{_ACTIVE} AND durable = 1 AND (owner IS NULL OR lease_until < ?)"
            cur.execute(self._sql(
                f"SELECT seq FROM requests WHERE {claimable} AND seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() "
                f"OVER (PARTITION BY tenant ORDER BY seq) AS turn FROM requests WHERE {claimable}) AS candidates "
                "ORDER BY turn, seq LIMIT ?) ORDER BY seq" + self._skip_locked), (now, now, limit))
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
        tenant: str = "",
    ) -> str | None:
        """Record the end of a request; returns the state recorded. With `owner`: only if that claim (owner,
        attempt) still holds the unfinished row, else None (refused: another replica took it over, or it ended);
        a row whose Cancel was acknowledged (the flag is committed before the answer) ends CANCELED whatever
        `state` says, checked under the same row lock as the write, so that no acknowledged cancel is overtaken.
        Without `owner`: a request that was never stored (a unary call whose images must be served by URL) gets
        its row, under `tenant` (who may see it). Image files are written, atomically each, under the row's lock
        and before the row points at them."""
        now = time.time()
        with self._tx() as cur:
            if owner is not None:
                cur.execute(self._sql("SELECT owner, attempt, state, cancel_requested FROM requests "
                                      f"WHERE id = ?{self._for_update}"), (request_id,))
                found = cur.fetchone()
                if found is None or found[0] != owner or found[1] != attempt or found[2] in TERMINAL:
                    return None
                if found[3] and state != CANCELED:
                    state, result, error, images = CANCELED, None, None, ()
                    logs = [*(logs or []), {"message": "canceled: the cancel arrived before the result was recorded",
                                            "level": "INFO", "timestamp": now}]
            if images:
                self.results.write(request_id, images)
            cur.execute(self._sql(
                """INSERT INTO requests (id, state, durable, request, created, finished, error, result, logs, tenant)
                   VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET state = excluded.state, finished = excluded.finished,
                       error = excluded.error, result = excluded.result, logs = excluded.logs,
                       lease_until = NULL"""),
                (request_id, state, request, now, now, error, result, json.dumps(logs or []), tenant),
            )
        return state

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


def _row(r: tuple) -> Row:
    return Row(
        id=r[0], state=r[1], durable=bool(r[2]), request=bytes(r[3]), webhook_url=r[4], webhook_done=bool(r[5]),
        created=r[6], started=r[7], finished=r[8], error=None if r[9] is None else bytes(r[9]),
        result=None if r[10] is None else bytes(r[10]), logs=json.loads(r[11] or "[]"),
        cancel_requested=bool(r[12]), origin=r[13], owner=r[14], attempt=r[15], progress=(r[16], r[17]), seq=r[18],
        tenant=r[19],
    )
