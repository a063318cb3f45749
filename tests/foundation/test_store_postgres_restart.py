"""The PostgreSQL store across a restart of the database server: while it is down a
write fails loudly and changes nothing; once it is back the same store object (no new
process) reads and writes again, and every acknowledged write is there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.store.postgres import PostgresStore, StoreUnavailable
from orchestrator.store.sqlite import Event, ObjectWrite
from orchestrator.testing import postgres as postgres_server

from .support import postgres_dsn


@pytest.fixture
def own_server() -> Iterator[postgres_server.PostgresServer]:
    """A server of this test's own: it is stopped and started, which others must not see."""
    with postgres_server.running() as server:
        if isinstance(server, str):
            pytest.skip(server)
        yield server


def test_the_store_reconnects_after_the_server_restarts_and_loses_nothing(own_server: postgres_server.PostgresServer) -> None:
    store = PostgresStore(own_server.create_database())
    try:
        acknowledged = [store.apply([ObjectWrite("Site", f"s{i}", {}, {"i": i})], Event("t", "apply", "", "", "before"))
                        for i in range(5)]
        own_server.stop("fast")
        with pytest.raises(StoreUnavailable, match="PostgreSQL store"):
            store.apply([ObjectWrite("Site", "down", {}, {"i": -1})])
        with pytest.raises(StoreUnavailable):
            store.get("Site", "s0")
        own_server.start()
        # reads and writes on the same object, no reopen
        assert [o.name for o in store.list("Site")] == [f"s{i}" for i in range(5)]
        assert store.get("Site", "down") is None  # the write refused while down left nothing
        assert store.resource_version() == acknowledged[-1][0].resource_version
        [after] = store.apply([ObjectWrite("Site", "s5", {}, {"i": 5})], Event("t", "apply", "", "", "after"))
        assert after.resource_version == acknowledged[-1][0].resource_version + 1
        assert [e.reason for e in store.events()] == ["before"] * 5 + ["after"]
        own_server.stop("fast")
        own_server.start()
        assert store.next_sequence("x") == 1  # a write is the first call after the restart
    finally:
        store.close()


def test_connections_detect_a_silent_database_within_seconds_unless_the_url_says_otherwise(own_server: postgres_server.PostgresServer) -> None:
    """A partition never closes the connection: TCP keepalives and a user timeout end it
    within seconds instead of the kernel's ~15 minutes. What the URL sets itself wins."""
    url = own_server.create_database()
    store = PostgresStore(url)
    try:
        dsn = postgres_dsn(store)
        assert "tcp_user_timeout=10000" in dsn and "keepalives_idle=5" in dsn, dsn
    finally:
        store.close()
    store = PostgresStore(url + "?tcp_user_timeout=2500&keepalives_idle=9")
    try:
        dsn = postgres_dsn(store)
        assert "tcp_user_timeout=2500" in dsn and "keepalives_idle=9" in dsn and "keepalives_count=3" in dsn, dsn
    finally:
        store.close()
