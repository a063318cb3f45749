"""PostgreSQL refusing a statement for a while (a failover that leaves the address on a
read-only standby, a session the server ended idle in a transaction, a lock another session
holds past a while) is the store's own StoreUnavailable, never a psycopg error: callers retry
it, and the API answers 503 with Retry-After, not a bare 500."""

from __future__ import annotations

import pathlib
import queue
import threading
import time

import httpx
import psycopg
import pytest

from orchestrator.store.postgres import PostgresStore, StoreUnavailable
from orchestrator.store.sqlite import Event, ObjectWrite
from orchestrator.testing import manifests
from orchestrator.testing.postgres import PostgresServer

from . import support
from .conftest import start_control_plane


def _read_only(postgres: PostgresServer, url: str, on: bool) -> None:
    """The database's address now reaches a server that takes reads only, as after a
    failover to a standby: the sessions open are cut."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))


def test_a_read_only_database_refuses_writes_as_unavailable_and_the_same_store_writes_once_it_takes_them(
        postgres: PostgresServer) -> None:
    url = postgres.create_database()
    store = PostgresStore(url)
    try:
        store.apply([ObjectWrite("Site", "a", {}, {"x": 1})], Event("t", "apply", "", "", "r"))
        _read_only(postgres, url, True)
        with pytest.raises(StoreUnavailable, match=r"refuses writes \(read-only"):
            store.apply([ObjectWrite("Site", "b", {}, {"x": 1})], Event("t", "apply", "", "", "r"))
        assert store.get("Site", "a") is not None and store.get("Site", "b") is None  # reads go on
        _read_only(postgres, url, False)
        store.apply([ObjectWrite("Site", "b", {}, {"x": 1})], Event("t", "apply", "", "", "r"))
        assert store.get("Site", "b") is not None
    finally:
        store.close()


def test_a_session_ended_idle_in_a_transaction_is_unavailable_and_the_store_goes_on(postgres: PostgresServer) -> None:
    store = PostgresStore(postgres.create_database(), idle_in_transaction_s=0.3)
    try:
        def slow() -> list[ObjectWrite]:  # writes decided in the transaction, after longer than the server allows
            time.sleep(0.8)
            return [ObjectWrite("Site", "a", {}, {"x": 1})]

        with pytest.raises(StoreUnavailable):
            store.apply(slow, Event("t", "apply", "", "", "r"))
        assert store.get("Site", "a") is None
        store.apply([ObjectWrite("Site", "a", {}, {"x": 1})], Event("t", "apply", "", "", "r"))
        assert store.get("Site", "a") is not None
    finally:
        store.close()


def test_an_apply_to_a_read_only_database_is_answered_503_with_retry_after(
        tmp_path: pathlib.Path, offline_fleet: pathlib.Path, postgres: PostgresServer) -> None:
    url = postgres.create_database()
    server = start_control_plane(tmp_path / "cp", offline_fleet, store=url)
    try:
        manifest = tmp_path / "site.yaml"
        manifest.write_text(manifests.edge_site("edge-ro", "FR", 48.0, 2.35, region="fr"))
        _read_only(postgres, url, True)
        answer = httpx.post(f"{server.url}/v1/apply", content=manifest.read_bytes(),
                            headers={"content-type": "application/yaml"}, timeout=30)
        assert answer.status_code == 503 and answer.headers.get("retry-after"), (answer.status_code, answer.text)
        assert "refuses writes (read-only" in answer.json()["error"]
        done = support.cli("apply", "-f", str(manifest), server_url=server.url)
        assert done.returncode != 0 and "refuses writes (read-only" in done.stderr, done.stderr
        _read_only(postgres, url, False)
        assert support.cli("apply", "-f", str(manifest), server_url=server.url).returncode == 0
    finally:
        server.stop()


def test_a_lock_another_session_holds_fails_the_call_after_a_while_and_the_store_goes_on(postgres: PostgresServer) -> None:
    """An operator's psql session left open in a transaction that locked a row the store
    writes (BEGIN; SELECT ... FOR UPDATE, then lunch) held the store's call, and every call
    queued behind it on its one connection, for as long as it stayed open: the server ends
    only the store's own idle transactions. A call now waits for such a lock as long as
    SQLite waits for a file another process holds, then fails as unavailable, naming it."""
    url = postgres.create_database()
    store = PostgresStore(url, lock_wait_s=0.5)
    outcome: queue.Queue[BaseException | None] = queue.Queue()

    def write_site() -> None:
        try:
            store.apply([ObjectWrite("Site", "a", {}, {"x": 2})], Event("t", "apply", "", "", "r"))
            outcome.put(None)
        except BaseException as exc:  # handed to the test
            outcome.put(exc)

    try:
        store.apply([ObjectWrite("Site", "a", {}, {"x": 1})], Event("t", "apply", "", "", "r"))
        with psycopg.connect(url) as operator:  # a transaction, as psql's BEGIN opens
            operator.execute("SELECT * FROM objects WHERE kind = 'Site' AND name = 'a' FOR UPDATE")
            threading.Thread(target=write_site, daemon=True).start()
            try:
                failed = outcome.get(timeout=20)  # a hang guard: the lock is held for as long as this waits
            except queue.Empty:
                failed = None
                pytest.fail("the store's write still waited on the operator's lock after 20 s")
            finally:
                operator.rollback()  # the write, were it still waiting, goes on and the thread ends
            assert isinstance(failed, StoreUnavailable), failed
            assert "waited 0.5 s for a lock another session holds" in str(failed), failed
        assert store.get("Site", "a").spec == {"x": 1}  # nothing written
        store.apply([ObjectWrite("Site", "a", {}, {"x": 2})], Event("t", "apply", "", "", "r"))
        assert store.get("Site", "a").spec == {"x": 2}
    finally:
        store.close()
