"""A replica of this version starting on a PostgreSQL database an earlier version kept:
the events index it adds is built beside the fleet's writes, never in front of them, and
a build that failed is done again."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from orchestrator.store.postgres import PostgresStore


@pytest.fixture
def earlier_database(postgres) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A database as the release before the events index left it: events, no ``events_time``."""
    url = postgres.create_database()
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP INDEX IF EXISTS events_time")
        conn.execute("INSERT INTO events (ts, actor, action, kind, name, reason, details) "
                     "SELECT 1.7e9 + g, 'scheduler', 'replica-placed', 'ModelDeployment', 'd', 'placed', '{}' FROM generate_series(1, 1000) AS g")
    yield url


def events_time(url: str) -> tuple[bool, str] | None:
    """Whether ``events_time`` is valid, and its definition; None while there is none."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                           "WHERE i.indexrelid = to_regclass('events_time')").fetchone()
    return None if row is None else (bool(row[0]), str(row[1]))


BUILT = (True, "CREATE INDEX events_time ON public.events USING btree (ts)")


def start_replica(url: str, within_s: float) -> PostgresStore:
    started: list[PostgresStore] = []
    starting = threading.Thread(target=lambda: started.append(PostgresStore(url)), daemon=True)
    starting.start()
    starting.join(within_s)
    assert started, f"a replica's start waited more than {within_s:g}s on the build of the events index"
    return started[0]


def test_replicas_building_the_events_index_hold_up_no_writes_of_the_fleet(earlier_database: str) -> None:
    # A transaction that wrote an event and has not ended: a build of the index waits for it,
    # as for every write of the table in flight (on a large table, the build itself takes as long).
    writer = psycopg.connect(earlier_database)
    writer.execute("INSERT INTO events (ts, actor, action, kind, name, reason, details) VALUES (1.8e9, 'api', 'apply', '', '', 'apply', '{}')")
    replicas: list[PostgresStore] = []
    try:
        replicas.append(start_replica(earlier_database, 10))
        replicas.append(start_replica(earlier_database, 10))  # the next one, during the rolling update
        leader = replicas[0]
        renewed: list[object] = []
        renewal = threading.Thread(target=lambda: renewed.append(leader.acquire_lease("leader", "cp-1", 3.0)), daemon=True)
        renewal.start()
        renewal.join(1.0)  # a third of the lease: the leader renews this often
        assert renewed and renewed[0] is not None, "the leader's lease renewal waited on the build of the events index"
        writer.commit()
        assert all(r.events_index.wait(30) for r in replicas)
        assert [r.events_index.error for r in replicas] == [None, None]
        assert events_time(earlier_database) == BUILT
    finally:
        writer.close()
        for r in replicas:
            r.close()


def test_an_events_index_a_failed_build_left_invalid_is_built_again(earlier_database: str) -> None:
    with psycopg.connect(earlier_database, autocommit=True) as conn:  # a concurrent build that failed leaves its index invalid
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY events_time ON events (actor)")
    assert events_time(earlier_database) == (False, "CREATE UNIQUE INDEX events_time ON public.events USING btree (actor)")
    store = PostgresStore(earlier_database)
    try:
        assert store.events_index.wait(30)
        assert events_time(earlier_database) == BUILT
    finally:
        store.close()


def test_replicas_starting_together_build_the_events_index_once_and_prune_before_it_is_there(earlier_database: str) -> None:
    stores: list[PostgresStore] = []
    try:
        starts = [threading.Thread(target=lambda: stores.append(PostgresStore(earlier_database)), daemon=True) for _ in range(3)]
        for t in starts:
            t.start()
        for t in starts:
            t.join(30)
        assert len(stores) == 3
        # retention deletes the oldest events whether or not the index is there yet
        assert stores[0].prune_events(1.7e9 + 101, audit=False) == 100
        assert all(s.events_index.wait(30) for s in stores)
        assert [s.events_index.error for s in stores] == [None, None, None]
        assert events_time(earlier_database) == BUILT
    finally:
        for s in stores:
            s.close()
