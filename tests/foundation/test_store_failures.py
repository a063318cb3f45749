"""When the state store cannot do what it is asked: writes SQLite refuses (a constraint, a full
disk) raised as the store's own errors, a writer paused inside a transaction, a store closed
with calls queued, and an SQLite file another connection or process holds."""

from __future__ import annotations

import asyncio
import pathlib
import queue
import sqlite3
import threading
import time

import pytest

from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.sqlite import Event, ObjectWrite

from .support import WHO, postgres_transaction, sqlite_connection, write


def test_a_write_sqlite_refuses_for_what_it_is_is_a_store_error_not_one_to_retry(tmp_path: pathlib.Path) -> None:
    """A constraint on the file (here a trigger that aborts the insert) refuses the same write
    every time: a plain StoreError, as PostgreSQL's store gives, not StoreUnavailable."""
    s = open_store(tmp_path / "state.db")
    try:
        with sqlite3.connect(tmp_path / "state.db") as db:
            db.execute("CREATE TRIGGER no_lab_sites BEFORE INSERT ON objects WHEN NEW.name LIKE 'lab-%' "
                       "BEGIN SELECT RAISE(ABORT, 'no lab sites here'); END")
        with pytest.raises(store_mod.StoreError, match="no lab sites here") as refused:
            s.apply([ObjectWrite("Site", "lab-1", {}, {"tier": "edge"})], Event("t", "created", "Site", "lab-1", "seed"))
        assert not isinstance(refused.value, store_mod.StoreUnavailable)
        assert s.get("Site", "lab-1") is None
    finally:
        s.close()


def test_a_write_a_full_sqlite_disk_refuses_is_a_store_error_and_changes_nothing(tmp_path: pathlib.Path) -> None:
    """SQLite's own page limit stands in for a full disk (SQLITE_FULL either way): the
    write is rolled back whole and raised as the store's error, one to retry (the API answers
    503), where sqlite3's own exception reached the API as a 500."""
    s = open_store(tmp_path / "state.db")
    try:
        s.apply([ObjectWrite("Site", "edge-1", {}, {"tier": "edge"})], Event("t", "created", "Site", "edge-1", "seed"))
        before, logged = s.list(), s.events()
        # no page beyond those it has (SQLite raises the limit to the file's current size)
        db = sqlite_connection(s)
        assert db.execute("PRAGMA max_page_count = 1").fetchone()[0] == db.execute("PRAGMA page_count").fetchone()[0]
        big = [ObjectWrite("Site", f"edge-{i}", {}, {"tier": "edge", "note": "x" * 4000}) for i in range(2, 40)]
        with pytest.raises(store_mod.StoreUnavailable, match=r"refused the operation: database or disk is full; nothing was changed"):
            s.apply(big, Event("t", "created", "Site", "many", "bulk"))
        assert s.list() == before and s.events() == logged
        db.execute("PRAGMA max_page_count = 1073741823")  # room again: writes go on
        s.apply(big, Event("t", "created", "Site", "many", "bulk"))
        assert len(s.list("Site")) == 39
    finally:
        s.close()


def test_a_writer_paused_inside_a_transaction_holds_the_write_lock_only_for_a_while(postgres) -> None:  # noqa: ANN001
    """A replica stopped mid-transaction (SIGSTOP, a frozen VM, a partition) kept the write
    lock, and so every other replica's writes and the next leader's election, for as long as
    its connection looked alive; the server now ends a session idle inside a transaction."""
    import psycopg

    from orchestrator.store.postgres import PostgresStore, StoreUnavailable

    url = postgres.create_database()
    paused_store, other = PostgresStore(url, idle_in_transaction_s=1.0), PostgresStore(url, idle_in_transaction_s=1.0)
    inside, resume, outcome = threading.Event(), threading.Event(), queue.Queue[str]()

    def paused() -> None:
        try:
            with postgres_transaction(paused_store) as db:  # holds the write lock
                inside.set()
                resume.wait(120)  # sends nothing, as a stopped process (for two minutes at most)
                db.execute("SELECT 1")
            outcome.put("committed")
        except (StoreUnavailable, psycopg.Error) as exc:
            outcome.put(f"ended by the server: {exc}")

    thread = threading.Thread(target=paused)
    thread.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        other.apply([ObjectWrite("Site", "edge-1", {}, {"tier": "edge"})], Event("t", "created", "Site", "edge-1", "while paused"))
        waited = time.monotonic() - started
    finally:
        resume.set()
        thread.join(30)
    assert other.get("Site", "edge-1") is not None
    assert waited < 60, waited  # half the two minutes the paused writer would have held it
    assert outcome.get(timeout=1).startswith("ended by the server"), "the paused transaction should not commit"
    paused_store.close()
    other.close()


async def test_a_closed_store_drops_the_calls_queued_behind_a_stalled_one(location: str) -> None:
    """The event loop's calls run on the store's own threads; closing the store (the server
    stopping) waits for none of them, drops those still queued, and refuses new ones."""
    store = open_store(location, threads=1)
    started, go = threading.Event(), threading.Event()

    def stalled() -> None:  # as a call on a stalled database waits
        started.set()
        assert go.wait(10)

    try:
        running = asyncio.ensure_future(store.run(stalled))
        queued = asyncio.ensure_future(store.run(store.list))
        assert await asyncio.to_thread(started.wait, 10)
        store.close()
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(store_mod.StoreError, match="closed"):
            await store.run(store.list)
    finally:
        go.set()
    await running


async def test_a_sqlite_store_closed_while_another_process_holds_the_file_stops_waiting_at_once(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another connection holds the file's write lock (an operator's ``sqlite3`` shell in a
    transaction): a write waits for it, but closing the store (the server stopping) ends that
    wait while the lock is still held, not at the end of SQLite's busy timeout (made an hour
    here, so a close that waited it out is told apart by a bound of a minute on any machine)."""
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 3600.0)
    path = tmp_path / "state.db"
    store = open_store(str(path), threads=1)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        store.apply([write("edge-1", {"tier": "edge"})], WHO)
        holder.execute("BEGIN IMMEDIATE")
        begun: list[str] = []
        waiting_turns = threading.Event()

        def traced(statement: str) -> None:  # each turn of the wait runs the write's BEGIN once more
            begun.append(statement)
            if begun.count("BEGIN IMMEDIATE") >= 2:
                waiting_turns.set()

        sqlite_connection(store).set_trace_callback(traced)
        waiting = asyncio.ensure_future(store.run(store.apply, [write("edge-2", {"tier": "edge"})], WHO))
        assert await asyncio.to_thread(waiting_turns.wait, 10), "the write never waited for the file's lock"
        try:  # the holder keeps the lock throughout: only the close can end the write's wait
            await asyncio.wait_for(asyncio.to_thread(store.close), 60)
        except TimeoutError:
            pytest.fail("closing the store waited for the write, which waits for the file's lock another connection holds")
        with pytest.raises(store_mod.StoreError, match="^the store is closed$"):
            await asyncio.wait_for(waiting, 60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        store.close()
    reopened = open_store(str(path))
    try:
        assert [o.name for o in reopened.list("Site")] == ["edge-1"]  # the write that waited changed nothing
    finally:
        reopened.close()


def test_a_sqlite_write_waits_for_another_connection_holding_the_file(tmp_path: pathlib.Path) -> None:
    """SQLite's lock on the file is waited for (another connection's short transaction), not
    refused at once: the store waits in short turns only to be able to stop."""
    path = tmp_path / "state.db"
    store = open_store(str(path))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(0.5, holder.execute, ("COMMIT",)).start()
        store.apply([write("edge-1", {"tier": "edge"})], WHO)
        assert [o.name for o in store.list("Site")] == ["edge-1"]
    finally:
        holder.close()
        store.close()
