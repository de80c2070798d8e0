"""The store contract, run against both backends (SQLite in a folder, PostgreSQL started by the session): what a
Submit, a claim, a lease, a cancel, a finish and a webhook delivery promise, whichever database keeps them."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import pytest

from server import storage as st
from server.storage import SchemaTooNew, SqliteStore, StoreUnavailable, new_request_id, open_store
from server.storage import sqlite as sqlite_backend
from tests.support.mounts import umount
from tests.support.postgres import new_database

pytestmark = pytest.mark.timeout(120)
REQUEST = b"\x0a\x03cat"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(tmp_path / "store")
    else:
        s = open_store(new_database(), tmp_path / "results")
    assert s.backend == request.param
    yield s
    s.close()


def _submit(store, n: int = 1, webhook: str = "") -> list[str]:
    ids = [new_request_id() for _ in range(n)]
    for rid in ids:
        store.add(rid, REQUEST, webhook)
    return ids


def test_submit_is_readable_and_queued_in_order(store) -> None:
    ids = _submit(store, 3)
    row = store.get(ids[0])
    assert (row.state, row.request, row.durable, row.owner, row.attempt) == (st.IN_QUEUE, REQUEST, True, None, 0)
    assert store.queued() == 3 and [store.position(i) for i in ids] == [0, 1, 2]
    assert store.get("not-an-id") is None and store.get("0" * 32) is None


def test_claims_take_the_oldest_and_never_the_same_row_twice(store) -> None:
    ids = _submit(store, 5)
    a = store.claim("a", 2, lease_s=60)
    b = store.claim("b", 10, lease_s=60)
    assert [r.id for r in a] == ids[:2] and [r.id for r in b] == ids[2:]
    assert all(r.owner == "a" and r.attempt == 1 for r in a)
    assert store.claim("c", 10, lease_s=60) == []


def test_claims_take_turns_between_tenants_and_keep_who_submitted(store) -> None:
    burst = [new_request_id() for _ in range(5)]
    for rid in burst:
        store.add(rid, REQUEST, tenant="alice")
    lone = new_request_id()
    store.add(lone, REQUEST, tenant="bob")
    first = store.claim("a", 2, lease_s=60)
    assert [r.id for r in first] == [burst[0], lone]  # bob's one request does not wait behind alice's five
    assert [r.tenant for r in first] == ["alice", "bob"] and store.get(lone).tenant == "bob"
    assert [r.id for r in store.claim("a", 10, lease_s=60)] == burst[1:]
    store.finish(burst[1], st.COMPLETED, request=REQUEST, owner="a", attempt=2 - 1)
    active, recent = store.tenant_load("alice", since=0.0)
    assert (active, recent) == (4, 5) and store.tenant_load("alice", since=1e12) == (4, 0)


def test_concurrent_claimers_split_the_queue(store) -> None:
    # enough rows and claimers that claims overlap: a row claimed by one while another's statement had already
    # picked it as a candidate must be skipped, not claimed twice (PostgreSQL re-checks only the outer WHERE)
    ids = _submit(store, 240)
    got: dict[str, list[str]] = {}

    def claimer(name: str) -> None:
        mine = got.setdefault(name, [])
        while rows := store.claim(name, 3, lease_s=60):
            mine.extend(r.id for r in rows)

    threads = [threading.Thread(target=claimer, args=(f"r{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [rid for rows in got.values() for rid in rows]
    assert sorted(claimed) == sorted(ids)  # every row once: none lost, none taken twice


def test_an_expired_lease_is_claimed_again_and_the_stale_result_is_refused(store) -> None:
    (rid,) = _submit(store)
    (first,) = store.claim("dead", 1, lease_s=0.01, now=1000.0)
    assert store.set_running(rid, "dead", first.attempt)
    assert store.claim("live", 1, lease_s=60, now=1000.0) == []  # still held
    (second,) = store.claim("live", 1, lease_s=60)  # the holder stopped renewing: its lease ran out
    assert second.state == st.IN_PROGRESS and second.attempt == first.attempt + 1
    assert not store.set_running(rid, "dead", first.attempt)
    assert store.finish(rid, st.COMPLETED, request=REQUEST, owner="live", attempt=second.attempt,
                        result=b"r", images=[("image_0.png", b"live")])
    # the stale replica's late result: refused, and its files do not replace the winner's
    assert not store.finish(rid, st.COMPLETED, request=REQUEST, owner="dead", attempt=first.attempt,
                            result=b"stale", images=[("image_0.png", b"dead")])
    # nor does a second finish of the winner's own claim
    assert not store.finish(rid, st.FAILED, request=REQUEST, owner="live", attempt=second.attempt)
    row = store.get(rid)
    assert (row.state, row.result) == (st.COMPLETED, b"r")
    assert store.image_path(rid, "image_0.png").read_bytes() == b"live"
    assert store.claim("any", 10, lease_s=60) == []


def test_renew_keeps_the_lease_reports_cancels_and_records_progress(store) -> None:
    ids = _submit(store, 2)
    rows = store.claim("a", 2, lease_s=0.5, now=1000.0)
    held, cancelled = store.renew("a", 60, {ids[0]: (3, 10)})
    assert held == set(ids) and cancelled == set()
    assert store.claim("b", 2, lease_s=60) == []  # renewed: not up for grabs
    assert store.get(ids[0]).progress == (3, 10)
    assert store.request_cancel(ids[1])
    assert store.renew("a", 60) == (set(ids), {ids[1]})
    store.finish(ids[0], st.COMPLETED, request=REQUEST, owner="a", attempt=rows[0].attempt)
    assert store.renew("a", 60)[0] == {ids[1]}  # ended rows are no longer held
    assert store.renew("b", 60) == (set(), set())


def test_release_hands_claims_back_at_once(store) -> None:
    ids = _submit(store, 3)
    rows = store.claim("a", 3, lease_s=3600)
    store.set_running(ids[0], "a", rows[0].attempt)
    assert store.release("a", [ids[2]]) == 1
    assert [r.id for r in store.claim("b", 5, lease_s=60)] == [ids[2]]
    assert store.release("a") == 2
    again = store.claim("b", 5, lease_s=60)
    assert [r.id for r in again] == ids[:2]
    assert again[0].state == st.IN_PROGRESS  # it had started: its next runner knows it is a re-run


def test_cancel_of_a_queued_request_nobody_holds_and_of_a_held_one(store) -> None:
    free, held = _submit(store, 2)
    assert store.request_cancel(free) and store.cancel_queued(free)
    assert store.get(free).state == st.CANCELED
    assert not store.request_cancel(free)  # ended
    (row,) = store.claim("a", 1, lease_s=60)
    assert row.id == held
    assert store.request_cancel(held)
    assert not store.cancel_queued(held)  # its holder ends it when it sees the flag
    assert store.get(held).cancel_requested


def test_an_acknowledged_cancel_wins_over_a_result_recorded_after_it(store) -> None:
    """The Cancel contract: once `request_cancel` is committed (and CANCELLATION_REQUESTED answered), the runner's
    finish records CANCELED under the same row lock, whatever it made: no result, no files."""
    (rid,) = _submit(store)
    (row,) = store.claim("a", 1, lease_s=60)
    assert store.set_running(rid, "a", row.attempt)
    assert store.request_cancel(rid)
    recorded = store.finish(rid, st.COMPLETED, request=REQUEST, owner="a", attempt=row.attempt, result=b"r",
                            images=[("image_0.png", b"png")], logs=[{"message": "completed"}])
    stored = store.get(rid)
    assert recorded == st.CANCELED and (stored.state, stored.result) == (st.CANCELED, None)
    assert store.image_path(rid, "image_0.png") is None
    assert [line["message"][:8] for line in stored.logs] == ["complete", "canceled"]
    assert not store.request_cancel(rid)  # ended: a later Cancel is told so


def test_webhook_delivery_is_claimed_once(store) -> None:
    (rid,) = _submit(store, webhook="https://example.com/hook")
    (row,) = store.claim("a", 1, lease_s=60)
    assert store.pending_webhooks() == []  # not ended yet
    assert not store.claim_webhook(rid, "a", 60)
    store.finish(rid, st.COMPLETED, request=REQUEST, owner="a", attempt=row.attempt)
    assert [r.id for r in store.pending_webhooks()] == [rid]
    assert store.claim_webhook(rid, "a", 60)
    assert not store.claim_webhook(rid, "b", 60)  # a live deliverer holds it
    assert store.pending_webhooks() == []
    store.mark_webhook_done(rid)
    assert not store.claim_webhook(rid, "a", 60) and store.pending_webhooks() == []


def test_an_abandoned_webhook_delivery_is_taken_over(store) -> None:
    (rid,) = _submit(store, webhook="https://example.com/hook")
    (row,) = store.claim("a", 1, lease_s=60)
    store.finish(rid, st.FAILED, request=REQUEST, owner="a", attempt=row.attempt, error=b"e")
    assert store.claim_webhook(rid, "a", lease_s=-1)  # its deliverer died: the lease is already over
    assert [r.id for r in store.pending_webhooks()] == [rid]
    assert store.claim_webhook(rid, "b", 60)


def test_unary_results_expiry_and_secrets(store) -> None:
    rid = new_request_id()
    assert store.finish(rid, st.COMPLETED, request=REQUEST, result=b"r", images=[("image_0.png", b"png")])
    row = store.get(rid)
    assert (row.state, row.durable) == (st.COMPLETED, False)
    assert store.image_path(rid, "image_0.png").read_bytes() == b"png"
    assert store.image_path(rid, "../image_0.png") is None
    with pytest.raises(ValueError):
        store.finish(new_request_id(), st.COMPLETED, request=REQUEST, images=[("../x.png", b"")])
    assert store.expire(3600) == 0
    assert store.expire(0, now=row.finished + 1) == 1
    assert store.get(rid) is None and store.image_path(rid, "image_0.png") is None
    key = store.secret("url-signing")
    assert len(key) == 32 and store.secret("url-signing") == key and store.secret("other") != key


def test_a_sqlite_store_locked_by_another_process_answers_store_unavailable(tmp_path) -> None:
    """Past SQLite's busy timeout (5 s) a locked database is StoreUnavailable (the transports' UNAVAILABLE / 503),
    nothing committed; the store works again once the lock is gone."""
    store = open_store(tmp_path / "store")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(120)",
         str(tmp_path / "store" / "requests.sqlite3")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rid = new_request_id()
        with pytest.raises(StoreUnavailable, match="cannot be written now: database is locked"):
            store.add(rid, REQUEST, "")
    finally:
        holder.kill()
        holder.wait(10)
    assert store.get(rid) is None
    store.add(rid, REQUEST, "")
    assert store.get(rid).state == st.IN_QUEUE
    store.close()


def test_a_sqlite_store_in_a_read_only_folder_is_refused_with_a_clear_error(tmp_path) -> None:
    """The folder read-only (a read-only bind mount: permissions do not bind the root user these tests may run
    as): StoreUnavailable naming the folder, not SQLite's bare "unable to open database file". A folder cannot be
    remounted read-only under a running store, which holds its database open for writing (the kernel refuses:
    busy); the locked database above is that case's equivalent."""
    real, view = tmp_path / "real", tmp_path / "view"
    open_store(real).close()
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(real), str(view)], capture_output=True).returncode != 0:
        pytest.skip("this machine cannot bind-mount (needs root): the read-only folder is not tested here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True, capture_output=True)
        with pytest.raises(StoreUnavailable, match=rf"database in {view} cannot be opened for writing: .*writable"):
            open_store(view)
    finally:
        umount(view)


def test_schema_versions(store, tmp_path) -> None:
    assert store.schema_version() == store.SCHEMA_VERSION
    if store.backend == "sqlite":
        db = sqlite3.connect(tmp_path / "store" / "requests.sqlite3")
        db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
        db.close()
        with pytest.raises(SchemaTooNew, match="newer than this server"):
            open_store(tmp_path / "store")
    else:
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute("UPDATE pixart_schema SET version = version + 1")
        with pytest.raises(SchemaTooNew, match="newer than this server"):
            open_store(store.url, tmp_path / "results")


def test_a_store_of_the_previous_release_is_migrated(tmp_path) -> None:
    """A SQLite store written before claims existed (version 2) opens, keeps its rows, and runs them."""
    folder = tmp_path / "old"
    folder.mkdir()
    db = sqlite3.connect(folder / "requests.sqlite3")
    db.executescript(sqlite_backend._SQLITE_SCHEMA)
    for statement in (*sqlite_backend._SQLITE_MIGRATIONS[0], *sqlite_backend._SQLITE_MIGRATIONS[1]):
        db.execute(statement)
    db.execute("INSERT INTO requests (id, state, durable, request, created) VALUES (?, 'IN_PROGRESS', 1, ?, 1.0)",
               ("ab" * 16, REQUEST))
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    s = SqliteStore(folder)
    try:
        assert s.schema_version() == s.SCHEMA_VERSION > 2
        (row,) = s.claim("a", 5, lease_s=60)
        assert (row.id, row.state, row.attempt) == ("ab" * 16, st.IN_PROGRESS, 1)
    finally:
        s.close()
