"""The state store on PostgreSQL: the same contract as the SQLite store, for several
control-plane replicas sharing one database.

Why these choices: every public mutation is one transaction that first takes one
transaction-scoped advisory lock, so writers are serialised across every replica
exactly as ``BEGIN IMMEDIATE`` serialises them on one SQLite file; the store-wide
``resourceVersion``, generations, conflicts, the event log and dry runs therefore
behave identically (one test suite runs against both). Specs, labels and statuses are
kept as canonical JSON text, not ``jsonb``, so "unchanged" means byte-equal canonical
JSON on both backends. The driver is psycopg 3; a connection that broke (the server
restarted, the network dropped) is replaced on the next call, and the call that saw
the break raises :class:`StoreUnavailable` without pretending to know whether a write
in flight committed, as does a database that refuses writes (a read-only standby); no
psycopg error leaves the store. The operations themselves are shared with the SQLite store in
:mod:`orchestrator.store.sql`; this file holds only what is PostgreSQL's own: the
schema, the connection and its transaction, the counters, leases for leadership, and the
store's time.

Why the store's time is the database server's clock: what one replica stamps (a token's
expiry, an event's time) another compares with its time, and replicas' clocks drift apart
(one two hours behind made one-hour tokens every other replica refused at once). The one
clock every replica reads is the server's. Asking it at each check would put a round trip
on every token check, so a replica measures how far its own clock is from the server's on
the round trips it makes anyway (each connection, each lease call) and adds that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row

from orchestrator.store import datacentre_records, event_sites, schema_version, site_regions
from orchestrator.store.credentials import BACKFILL_TOKEN_SEQ
from orchestrator.store.sql import SqlStore
from orchestrator.store.threads import DEFAULT_THREADS, ConnectionLock, StoreThreads
from orchestrator.store.values import Fenced, Lease, StoreError, StoreUnavailable

__all__ = ["ChangeFeed", "EventsIndex", "Fenced", "Lease", "PostgresStore", "StoreUnavailable"]

log = logging.getLogger(__name__)

#: a deleted data-centre Site whose applications are still to be removed, as earlier versions
#: keep it (they share the database during a rolling update or a downgrade: see :mod:`orchestrator.store.datacentre_records`)
DELETED_SITES = "CREATE TABLE IF NOT EXISTS deleted_sites (name TEXT PRIMARY KEY, spec TEXT NOT NULL, version BIGINT NOT NULL)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL,
    labels TEXT NOT NULL, annotations TEXT NOT NULL DEFAULT '{}', spec TEXT NOT NULL, status TEXT NOT NULL DEFAULT '{}',
    generation BIGINT NOT NULL, resource_version BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, capture_since DOUBLE PRECISION,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS placements (
    deployment TEXT NOT NULL, site TEXT NOT NULL, variant TEXT NOT NULL,
    replicas BIGINT NOT NULL CHECK (replicas > 0),
    PRIMARY KEY (deployment, site, variant)
);
CREATE TABLE IF NOT EXISTS events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    reason TEXT NOT NULL, details TEXT NOT NULL
);
DO $$ BEGIN  -- not CREATE INDEX IF NOT EXISTS: that locks the table first, and would wait on a build of events_time
    IF to_regclass('events_object') IS NULL THEN CREATE INDEX events_object ON events (kind, name, id); END IF;
    -- lists are paged in byte order (COLLATE "C", as SQLite sorts), which the primary keys, in
    -- the database's collation, cannot give: without these each page reads and sorts its table
    IF to_regclass('objects_bytewise') IS NULL THEN CREATE INDEX objects_bytewise ON objects (kind, name COLLATE "C"); END IF;
    IF to_regclass('placements_bytewise') IS NULL THEN
        CREATE INDEX placements_bytewise ON placements (deployment COLLATE "C", site COLLATE "C", variant COLLATE "C");
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, purpose TEXT NOT NULL,
    role TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION,
    revoked BOOLEAN NOT NULL DEFAULT FALSE, description TEXT NOT NULL DEFAULT '', created_seq BIGINT,
    models TEXT NOT NULL DEFAULT '', residency TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS agents (
    site TEXT PRIMARY KEY, agent_id TEXT NOT NULL, credential_digest TEXT NOT NULL,
    joined_at DOUBLE PRECISION NOT NULL, revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, token BIGINT NOT NULL, expires_at DOUBLE PRECISION NOT NULL
);
ALTER TABLE objects ADD COLUMN IF NOT EXISTS annotations TEXT NOT NULL DEFAULT '{}';  -- databases made before annotations were kept
ALTER TABLE objects ADD COLUMN IF NOT EXISTS capture_since DOUBLE PRECISION;  -- made before capture turned on again was told apart
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS created_seq BIGINT;  -- databases made before tokens kept it
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS models TEXT NOT NULL DEFAULT '';  -- made before tokens were scoped: unscoped
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS residency TEXT NOT NULL DEFAULT '';
""" + BACKFILL_TOKEN_SEQ + """;
CREATE TABLE IF NOT EXISTS published (key TEXT PRIMARY KEY, version BIGINT NOT NULL, body TEXT NOT NULL);
""" + DELETED_SITES + """;
CREATE TABLE IF NOT EXISTS left_targets (
    name TEXT NOT NULL, target TEXT NOT NULL, spec TEXT NOT NULL, version BIGINT NOT NULL, PRIMARY KEY (name, target)
);
CREATE TABLE IF NOT EXISTS daily_counts (key TEXT PRIMARY KEY, day BIGINT NOT NULL, taken BIGINT NOT NULL);  -- capture.dailyCap
DO $$ BEGIN  -- databases made before leases were kept in epoch seconds, as on SQLite
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'leases' AND column_name = 'expires_at'
               AND data_type LIKE 'timestamp%') THEN
        ALTER TABLE leases ALTER COLUMN expires_at TYPE DOUBLE PRECISION USING EXTRACT(EPOCH FROM expires_at);
    END IF;
END $$;
INSERT INTO meta (key, value) VALUES ('resource_version', 0) ON CONFLICT (key) DO NOTHING;
INSERT INTO meta (key, value) VALUES ('store_id', floor(random() * 9007199254740991)::bigint) ON CONFLICT (key) DO NOTHING;
INSERT INTO meta (key, value) VALUES ('events_pruned_through', 0) ON CONFLICT (key) DO NOTHING;
""" + event_sites.SCHEMA.format(id="BIGINT")

#: A database that stops answering without closing the connection (a partition, a frozen
#: host) is found within seconds, not at the kernel's retransmission timeout (~15 min),
#: during which every call on the connection would wait: unacknowledged data for 10 s
#: (``tcp_user_timeout``), or an idle connection after 5 s and 3 unanswered probes 2 s apart.
LIVENESS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3, "tcp_user_timeout": 10_000}

WRITE_LOCK = 0x6564_6765  # the advisory lock every write transaction holds ("edge")
INDEX_LOCK = 0x6564_6769  # the session lock of the replica building the events index ("edgi")
SITES_LOCK = 0x6564_6773  # the session lock of the replica indexing the sites of earlier events ("edgs")

#: How long the server lets a session sit idle inside a transaction before it ends it. A
#: replica paused or cut off mid-transaction (SIGSTOP, a frozen VM, a partition) would
#: otherwise hold the write lock, and so every replica's writes and the new leader's
#: election, for as long as its connection looks alive: forever while paused. The store's
#: own transactions send their statements back to back (milliseconds apart).
IDLE_IN_TRANSACTION_S = 5.0

#: How long a statement waits for a lock another session holds before it fails, as long as a
#: call on SQLite waits for a file another process holds (``sqlite.BUSY_TIMEOUT_S``). The
#: store's own writers hold theirs for milliseconds, a paused one for IDLE_IN_TRANSACTION_S at
#: most; a session that is not the store's (an operator's psql left open in a transaction
#: that locked a row, a migration's ALTER TABLE) would otherwise hold the call, and every call
#: queued behind it on the replica's one connection, for as long as it stays open.
LOCK_WAIT_S = 30.0

CHANNEL = "edgeplane_changes"  # what a write transaction changed, told to every replica at its commit (NOTIFY)


class PostgresStore(SqlStore):
    placeholder = "%s"
    collate = ' COLLATE "C"'  # byte-wise, as SQLite sorts text
    contains = "strpos(details, ?) > 0"

    def __init__(self, url: str, clock: Callable[[], float] | None = None, connect_timeout_s: float = 5.0,
                 idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S, threads: int = DEFAULT_THREADS,
                 lock_wait_s: float = LOCK_WAIT_S, wall: Callable[[], float] = time.time,
                 index_sites: Callable[[SqlStore, int], int] | None = None):
        """``clock``: the store's time, when given (a test's, to make tokens expire); by default
        the database server's clock, which this replica reads as ``wall`` (its own clock) plus
        their difference, measured on each connection and each lease call (:meth:`now`).
        ``index_sites``: what indexes a batch of events in the background (a test's)."""
        try:
            conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise StoreError(f"not a PostgreSQL URL: {_one_line(e)}") from None
        self.threads = StoreThreads(threads)  # its threads start when asked
        self.url = url
        self.path = _redacted(url)  # what logs and `serve` print: never the password
        self._wall = wall
        self._offset = 0.0  # the database server's clock minus this replica's (wall), as last measured
        self._clock = clock if clock is not None else self._database_time
        self._timeout = connect_timeout_s
        self._idle_in_transaction_ms = max(1, round(idle_in_transaction_s * 1000))
        self._lock_wait_s = lock_wait_s
        self._lock = ConnectionLock()  # the lease's calls first
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._closed = False
        self._pending: set[str] = set()  # what the write transaction in progress changed (_changed)
        self.backend_pid: int | None = None  # the server process of this store's connection: its own writes
        # what the URL sets itself wins over LIVENESS and the connect timeout
        self._from_url = {k: v for k, v in conninfo.conninfo_to_dict(url).items() if k in (*LIVENESS, "connect_timeout")}
        try:
            with self._tx() as db:  # under the write lock: two replicas starting at once
                has_meta = db.execute("SELECT to_regclass('meta') IS NOT NULL AS present").fetchone()["present"]  # type: ignore[index]
                found = schema_version.check(self, db, has_meta)  # a newer release's database: refused, nothing written
                db.execute(SCHEMA)
                if "version" in self._primary_key(db, "deleted_sites"):  # keyed by name and version for a while
                    datacentre_records.key_by_name(self, db, DELETED_SITES)
                site_regions.compose(self, db)  # an earlier release's decomposed regions
                schema_version.stamp(self, db, found)
        except StoreError:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
            raise
        self.events_index = EventsIndex(self)
        self.events_index.start()
        # what an earlier release logged: indexed in the background, by one replica at a time
        self.event_sites = event_sites.Backfill(self, turn=self._sites_turn, index_batch=index_sites)
        self.event_sites.start()

    @contextlib.contextmanager
    def _sites_turn(self, stop: threading.Event, retry_s: float = 0.5) -> Iterator[bool]:
        """Whether this replica has the turn to index the sites of earlier events (False once
        ``stop`` is set first): a session lock held on a connection of its own while it does,
        which the server lets go with the connection if the replica dies; replicas started
        together wait their turn, and the next finds the work done. Tried, not waited for, so
        that ``stop`` ends the wait."""
        try:
            with psycopg.connect(self.url, autocommit=True, **self.connect_options()) as conn:
                while not conn.execute("SELECT pg_try_advisory_lock(%s)", (SITES_LOCK,)).fetchone()[0]:  # type: ignore[index]
                    if stop.wait(retry_s):
                        break
                yield not stop.is_set()
        except psycopg.Error as e:
            raise _failed(self.path, e) from e

    @staticmethod
    def _primary_key(db: psycopg.Connection[dict[str, Any]], table: str) -> set[str]:
        """The columns of ``table``'s primary key, in this connection's schema (a table of the
        same name in another schema is not this store's)."""
        rows = db.execute(
            "SELECT k.column_name FROM information_schema.table_constraints c JOIN information_schema.key_column_usage k"
            " ON k.constraint_schema = c.constraint_schema AND k.constraint_name = c.constraint_name"
            " WHERE c.constraint_type = 'PRIMARY KEY' AND c.table_schema = current_schema() AND c.table_name = %s"
            " AND k.table_schema = current_schema() AND k.table_name = %s", (table, table)).fetchall()
        return {r["column_name"] for r in rows}

    def close(self, wait_s: float = 1.0) -> None:
        """Refuse new calls, drop the queued ones and close the connection. A call still
        waiting on the database after ``wait_s`` (a stalled database may never answer) has the
        connection shut under it: it fails at once, as on a connection lost, and its thread
        ends, so a replica stops, and its process exits, without waiting for the database."""
        self.threads.close()
        self._closed = True  # the call that has the connection must not open another
        self.events_index.close()
        self.event_sites.close(0)  # no other batch; the one under way ends with the calls below
        if not self._lock.acquire(wait_s):
            self._shut()
            self._lock.acquire()
        try:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        finally:
            self._lock.release()

    def _shut(self) -> None:
        """Shut the connection's socket down under the call that holds it. Not psycopg's
        ``cancel()``: that asks the server, which a stalled or frozen one never answers, nor
        ``close()`` from here, which closes the socket while the call still waits on it (its
        number free for another file meanwhile): shut down, it stays open, its holder's."""
        conn = self._conn
        with contextlib.suppress(OSError, psycopg.Error):  # closed meanwhile: nothing left to shut
            if conn is not None and not conn.closed:
                with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, **self.connect_options())
                self._conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
                                   "set_config('lock_timeout', %s, false)",
                                   (str(self._idle_in_transaction_ms), str(max(1, round(self._lock_wait_s * 1000)))))
                self._read_clock(self._conn)  # before any stamp this connection writes
            except psycopg.OperationalError as e:
                raise StoreUnavailable(f"cannot reach the PostgreSQL store at {self.path}: {_one_line(e)}") from e
            except psycopg.ProgrammingError as e:  # e.g. an unknown parameter in the URL
                raise StoreError(f"not a usable PostgreSQL URL ({self.path}): {_one_line(e)}") from None
            self.backend_pid = self._conn.info.backend_pid
        return self._conn

    def connect_options(self) -> dict[str, Any]:
        """psycopg's keyword arguments for a connection to this store (liveness, timeout)."""
        return {**LIVENESS, "connect_timeout": max(1, int(self._timeout)), **self._from_url}

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """One read. A read changes nothing, so a connection found broken (the server
        restarted since the last call) is replaced and the read made once more."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]
                except psycopg.Error as e:
                    if attempt == 2 or not conn.broken:
                        raise self._failed(e) from e
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _tx(self, commit: bool = True) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """One write transaction, serialised with every other writer on the database;
        ``commit=False`` rolls it back at the end (a dry run). A connection found broken
        when the transaction begins (nothing sent yet) is replaced once; a failure after
        that raises :class:`StoreUnavailable`: the write may or may not have committed."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    conn.execute("BEGIN")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    self._pending = set()
                    break
                except psycopg.Error as e:
                    if attempt == 2 or not conn.broken:
                        raise self._failed(e) from e
            try:
                yield conn
            except BaseException as e:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                if isinstance(e, psycopg.Error):
                    raise self._failed(e) from e
                raise
            try:
                if commit and self._pending:  # delivered at the commit, never for a rolled-back write
                    conn.execute("SELECT pg_notify(%s, what) FROM unnest(%s::text[]) AS what", (CHANNEL, sorted(self._pending)))
                conn.execute("COMMIT" if commit else "ROLLBACK")
            except psycopg.Error as e:
                raise self._failed(e) from e

    def _failed(self, error: psycopg.Error) -> StoreError:
        """The store's error for a failed statement (:func:`_failed`); one that waited out
        :data:`LOCK_WAIT_S` says what held it."""
        if isinstance(error, psycopg.errors.LockNotAvailable):
            return StoreUnavailable(f"the PostgreSQL store at {self.path} waited {self._lock_wait_s:g} s for a lock another "
                                    "session holds (a transaction left open: see pg_stat_activity) and gave up; retry once "
                                    f"it ends: {_one_line(error)}")
        return _failed(self.path, error)

    def _changed(self, db: psycopg.Connection[dict[str, Any]], what: str) -> None:
        self._pending.add(what)

    def follow_changes(self, on_change: Callable[[str], None]) -> ChangeFeed:
        feed = ChangeFeed(self, on_change)
        feed.start()
        return feed

    def _next_version(self, db: psycopg.Connection[dict[str, Any]]) -> int:
        row = db.execute("UPDATE meta SET value = value + 1 WHERE key = 'resource_version' RETURNING value").fetchone()
        return int(row["value"])  # type: ignore[index]

    def next_sequences(self, key: str, count: int, lease: Lease | None = None, above: int = 0) -> range:
        count = max(1, count)
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            row = db.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, %s) + %s RETURNING value",
                (f"seq:{key}", above + count, above, count),
            ).fetchone()
            last = int(row["value"])  # type: ignore[index]
        return range(last - count + 1, last + 1)

    def _many(self, db: psycopg.Connection[dict[str, Any]], sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with db.cursor() as cur:
            cur.executemany(sql, rows)

    def _lease_now(self, db: psycopg.Connection[dict[str, Any]]) -> float:
        return self._read_clock(db)  # the database's clock, the same for every replica

    def _read_clock(self, db: psycopg.Connection[dict[str, Any]]) -> float:
        """The database server's clock now, in epoch seconds (one statement), and how far this
        replica's clock is from it, measured on the way: the server read its clock between the
        two readings of ours, taken as halfway (off by half the round trip at most)."""
        before = self._wall()
        row = db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now").fetchone()
        after = self._wall()
        now = float(row["now"])  # type: ignore[index]
        self._offset = now - (before + after) / 2
        return now

    def _database_time(self) -> float:
        """The database server's clock without asking it: this replica's clock and the difference
        last measured (each lease call, every third of the lease on every replica)."""
        return self._wall() + self._offset


class EventsIndex:
    """The index retention deletes the oldest events by (``events_time``), built where it is
    missing without holding anyone's writes: ``CREATE INDEX CONCURRENTLY`` on a connection and
    thread of its own, after the schema transaction.

    Why not in :data:`SCHEMA`: a database an earlier version kept may hold millions of
    events, and a plain build there runs under the write lock, so every replica's writes, the
    leader's lease renewal included, waited on the first replica of this version to start,
    and the leader lost its lease. Until the index is there, retention works without it
    (slower). Replicas starting together take turns on a session lock; the next one finds it
    built. A build that failed or was stopped (its replica exited) leaves the index invalid:
    the next replica to start drops it and builds it again, unless a build of it is under way
    (one an operator started by hand).
    """

    def __init__(self, store: PostgresStore, retry_s: float = 0.5):
        self.store = store
        self.retry_s = retry_s  # how often a replica waiting for another's build tries for the lock
        self.error: str | None = None  # why the last try failed (the next start tries again)
        self._conn: psycopg.Connection[Any] | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-events-index", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Whether the build (or the check that finds it done) ended within ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop a build under way (the index is left invalid, which the next start rebuilds)."""
        self._closing.set()
        conn = self._conn
        with contextlib.suppress(psycopg.Error):
            if conn is not None and not conn.closed:
                conn.cancel_safe(timeout=timeout_s)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.store.url, autocommit=True, **self.store.connect_options()) as conn:
                self._conn = conn
                if not self._closing.is_set():
                    self._ensure(conn)
        except psycopg.Error as e:
            self.error = _one_line(e)
            if not self._closing.is_set():
                log.warning("could not build the index events_time on %s (the next start tries again): %s", self.store.path, self.error)
        finally:
            self._conn = None

    def _ensure(self, conn: psycopg.Connection[Any]) -> None:
        # Tried, not waited for: a statement waiting on the lock is a transaction the other
        # replica's concurrent build waits for in turn (a deadlock the server breaks).
        while not conn.execute("SELECT pg_try_advisory_lock(%s)", (INDEX_LOCK,)).fetchone()[0]:  # type: ignore[index]
            if self._closing.wait(self.retry_s):
                return
        row = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('events_time')").fetchone()
        if row is not None and row[0]:
            return
        if row is not None:
            building = conn.execute(
                "SELECT 1 FROM pg_stat_progress_create_index WHERE relid = to_regclass('events')"
                " AND datid = (SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()
            if building is not None:  # someone else's build, not a replica's: it ends on its own
                return
            log.warning("the index events_time is invalid (a build of it failed or was stopped): building it again")
            conn.execute("DROP INDEX CONCURRENTLY IF EXISTS events_time")
        started = time.monotonic()
        conn.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS events_time ON events (ts)")
        log.info("built the index events_time in %.1fs", time.monotonic() - started)


class ChangeFeed:
    """Other processes' writes to the store as they commit: LISTEN on a connection of
    its own, in a thread of its own.

    Why: followers read the leader's endpoint table, and the leader reads applies and
    wakes made through followers; read every second, each waited up to a second. A
    notification arrives within milliseconds of the commit, so those readers wake at
    once. Notifications are a hint, not the record: one can be lost while this
    connection is down, so the readers still read on their own schedule, and every
    (re)connection is reported as ``*`` (anything may have changed meanwhile). This
    store's own writes (its connection's server process) are not reported.
    """

    def __init__(self, store: PostgresStore, on_change: Callable[[str], None], retry_s: tuple[float, float] = (0.25, 5.0)):
        self.store = store
        self.on_change = on_change
        self.retry_s = retry_s
        self.connected = False
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-changes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop listening (within one poll of the connection, 0.2 s)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        delay = self.retry_s[0]
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.store.url, autocommit=True, **self.store.connect_options()) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected, self.last_error, delay = True, None, self.retry_s[0]
                    self.on_change("*")
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.2):
                            if note.pid != self.store.backend_pid:
                                self.on_change(note.payload)
            except psycopg.Error as e:
                self.last_error = _one_line(e)
            self.connected = False
            self._stop.wait(delay)
            delay = min(2 * delay, self.retry_s[1])


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _failed(path: str, error: psycopg.Error) -> StoreError:
    """The store's error for a failed statement: no psycopg error leaves the store. One the
    database may not give next time (unreachable, a session it ended, read-only during a
    failover) is :class:`StoreUnavailable`, to retry; a statement refused for what it is (a
    constraint, a bug) is a plain :class:`StoreError`, the psycopg error its cause."""
    if isinstance(error, psycopg.errors.ReadOnlySqlTransaction):
        return StoreUnavailable(f"the PostgreSQL store at {path} refuses writes (read-only: a standby, or a database set "
                                f"read-only); retry once it takes writes again: {_one_line(error)}")
    if isinstance(error, (psycopg.OperationalError, psycopg.InternalError)):  # InternalError: e.g. a session ended idle in a transaction
        return StoreUnavailable(f"the PostgreSQL store at {path} failed: {_one_line(error)}")
    return StoreError(f"the PostgreSQL store at {path} refused the operation: {_one_line(error)}")


def _redacted(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    info = conninfo.conninfo_to_dict(url)
    if info.get("password"):
        return url.replace(f":{info['password']}@", ":***@")
    return url
