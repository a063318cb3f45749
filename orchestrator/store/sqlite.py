"""The state store on one embedded SQLite file.

Why SQLite: the control plane must run on one machine with nothing else installed, and
must survive being killed at any instant. Each public mutation is one ``BEGIN IMMEDIATE``
transaction (so writers are serialised and a crash leaves either all of it or none), the
journal is WAL (readers never block the writer), and every object carries a
``generation`` (bumped when its spec changes) and a store-wide ``resourceVersion``
(bumped on every write) for optimistic concurrency: a write that names a stale
``resourceVersion`` is refused with :class:`Conflict`, never silently lost.

The event log is append-only (retention aside: the leader deletes its oldest events, see
:mod:`orchestrator.event_retention`): who did what, to which object, when and why. What this
file holds is only what is SQLite's own (the schema, the connection, the transaction);
the operations are shared with the PostgreSQL store in :mod:`orchestrator.store.sql`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from edge_agent import state as state_files
from orchestrator.store import datacentre_records, event_sites, schema_version, site_regions
from orchestrator.store.credentials import BACKFILL_TOKEN_SEQ
from orchestrator.store.sql import SqlStore, _canonical
from orchestrator.store.threads import DEFAULT_THREADS, ConnectionLock, StoreThreads
from orchestrator.store.values import (  # re-exported: the control plane names the store's records from here
    AgentSaved,
    Conflict,
    DeletedSite,
    Event,
    Fenced,
    Lease,
    LoggedEvent,
    NotFound,
    ObjectWrite,
    PlacementRow,
    StoredObject,
    StoreError,
    StoreUnavailable,
    TokenInfo,
    Unchanged,
    WriteOutcome,
    capture_since,
    datacentre_target,
    digest,
    new_secret,
)

__all__ = [
    "AgentSaved", "Conflict", "DeletedSite", "Event", "Fenced", "Lease", "LoggedEvent", "NotFound", "ObjectWrite", "PlacementRow", "SCHEMA", "Store",
    "StoredObject", "StoreError", "StoreUnavailable", "TokenInfo", "Unchanged", "WriteOutcome", "_canonical", "capture_since", "datacentre_target", "digest", "new_secret",
]

#: a deleted data-centre Site whose applications are still to be removed, as earlier versions
#: keep it (they share the store during a rolling update or a downgrade: see :mod:`orchestrator.store.datacentre_records`)
SCHEMA_DELETED_SITES = "CREATE TABLE IF NOT EXISTS deleted_sites (name TEXT PRIMARY KEY, spec TEXT NOT NULL, version INTEGER NOT NULL)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL,
    labels TEXT NOT NULL, annotations TEXT NOT NULL DEFAULT '{}', spec TEXT NOT NULL, status TEXT NOT NULL DEFAULT '{}',
    generation INTEGER NOT NULL, resource_version INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, capture_since REAL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS placements (
    deployment TEXT NOT NULL, site TEXT NOT NULL, variant TEXT NOT NULL,
    replicas INTEGER NOT NULL CHECK (replicas > 0),
    PRIMARY KEY (deployment, site, variant)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    reason TEXT NOT NULL, details TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_object ON events (kind, name, id);
CREATE INDEX IF NOT EXISTS events_time ON events (ts);  -- retention deletes the oldest
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, purpose TEXT NOT NULL,
    role TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL,
    revoked INTEGER NOT NULL DEFAULT 0, description TEXT NOT NULL DEFAULT '', created_seq INTEGER,
    models TEXT NOT NULL DEFAULT '', residency TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS agents (
    site TEXT PRIMARY KEY, agent_id TEXT NOT NULL, credential_digest TEXT NOT NULL,
    joined_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS published (key TEXT PRIMARY KEY, version INTEGER NOT NULL, body TEXT NOT NULL);
""" + SCHEMA_DELETED_SITES + """;
CREATE TABLE IF NOT EXISTS left_targets (
    name TEXT NOT NULL, target TEXT NOT NULL, spec TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, target)
);
CREATE TABLE IF NOT EXISTS daily_counts (key TEXT PRIMARY KEY, day INTEGER NOT NULL, taken INTEGER NOT NULL);  -- capture.dailyCap
INSERT OR IGNORE INTO meta (key, value) VALUES ('resource_version', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', random() & 9223372036854775807);
INSERT OR IGNORE INTO meta (key, value) VALUES ('events_pruned_through', 0);
""" + event_sites.SCHEMA.format(id="INTEGER")

#: How long a call waits while another process holds the lock it needs on the file (an
#: operator's ``sqlite3`` shell in a transaction, a backup tool) before it fails.
BUSY_TIMEOUT_S = 30.0
#: SQLite's own wait for a lock is one sleeping loop that ``Connection.interrupt()`` does not
#: end (it ends a statement running, not one waiting): the store waits in turns this long
#: and between them asks whether it is closing, so a server stopped during such a stall
#: stops within a turn, not at the end of :data:`BUSY_TIMEOUT_S`.
BUSY_TURN_S = 0.1


def _patiently(db: sqlite3.Connection, sql: str, args: Sequence[Any], closing: threading.Event) -> sqlite3.Cursor:
    """``db.execute(sql, args)``, waiting up to :data:`BUSY_TIMEOUT_S` while another
    process holds the lock it needs; StoreError at once if ``closing`` is set meanwhile."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return db.execute(sql, args)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            if closing.is_set():
                raise StoreUnavailable("the store is closed") from None


#: SQLite's refusals that the same call may not meet later: another process holding the file
#: past :data:`BUSY_TIMEOUT_S`, a full disk, an I/O error, a file made read-only.
_FOR_NOW = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
                      sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_INTERRUPT})


def _refused(exc: sqlite3.Error, message: str) -> StoreError:
    """The store's error for ``exc``, as PostgreSQL's store tells them apart: one SQLite may
    not give next time is :class:`StoreUnavailable`, to retry; one refused for what it is (a
    constraint, a bug) a plain :class:`StoreError`."""
    code = getattr(exc, "sqlite_errorcode", None)
    return StoreUnavailable(message) if code is not None and code & 0xFF in _FOR_NOW else StoreError(message)


def _own(path: str) -> int:
    """Hold ``<path>.owner`` (see :func:`edge_agent.state.hold`): one control plane per file."""
    try:
        return state_files.hold(pathlib.Path(f"{path}.owner"))
    except state_files.Held as held:
        raise StoreError(f"another control plane{f' ({held.holder})' if held.holder else ''} is using {path}: "
                         "stop it first, or give this one another --data-dir or --store") from None


class Store(SqlStore):
    def __init__(self, path: str | pathlib.Path, clock: Callable[[], float] = time.time, *, exclusive: bool = False,
                 threads: int = DEFAULT_THREADS, index_sites: Callable[[SqlStore, int], int] | None = None):
        """``exclusive``: this process is the file's one writer (a control plane: it leads
        without a lease, so a second one on the same file would act unfenced beside it);
        another process that holds the file so is refused, until it ends (a lock the
        kernel drops with the process, kill -9 included). ``threads``: what :meth:`run` lends.
        ``index_sites``: what indexes a batch of events in the background (a test's)."""
        self.threads = StoreThreads(threads)  # first: a wrong count refuses before the file is held (its threads start when asked)
        self.path = str(path)
        self._clock = clock
        self._lock = ConnectionLock()  # the lease's calls first
        self._closing = threading.Event()  # a call waiting for another process's lock gives up
        self._owner_fd: int | None = None
        if self.path != ":memory:":
            pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                self._owner_fd = _own(self.path)
        try:
            self._db = self._open()
        except BaseException:
            self._disown()
            raise
        # what an earlier release logged: indexed in the background, the reads by site exact meanwhile
        self.event_sites = event_sites.Backfill(self, index_batch=index_sites)
        self.event_sites.start()

    def _open(self) -> sqlite3.Connection:
        """The connection, its schema made or brought up to date; a file SQLite cannot use
        is a :class:`StoreError` and nothing of it was changed."""
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TURN_S)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store {self.path}: {exc}") from None
        try:
            db.row_factory = sqlite3.Row
            _patiently(db, "PRAGMA journal_mode=WAL", (), self._closing)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            _patiently(db, "BEGIN IMMEDIATE", (), self._closing)
            has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is not None
            found = schema_version.check(self, db, has_meta)  # a newer release's store: refused, nothing written
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            columns = {r["name"] for r in db.execute("PRAGMA table_info(objects)")}
            if "annotations" not in columns:  # a file made before annotations were kept
                db.execute("ALTER TABLE objects ADD COLUMN annotations TEXT NOT NULL DEFAULT '{}'")
            if "capture_since" not in columns:  # made before capture turned on again was told apart
                db.execute("ALTER TABLE objects ADD COLUMN capture_since REAL")
            token_columns = {r["name"] for r in db.execute("PRAGMA table_info(tokens)")}
            if "created_seq" not in token_columns:  # made before tokens kept it
                db.execute("ALTER TABLE tokens ADD COLUMN created_seq INTEGER")
                db.execute(BACKFILL_TOKEN_SEQ)
            for column in ("models", "residency"):  # made before tokens were scoped: every old token is unscoped
                if column not in token_columns:
                    db.execute(f"ALTER TABLE tokens ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            if any(r["name"] == "version" and r["pk"] for r in db.execute("PRAGMA table_info(deleted_sites)")):
                datacentre_records.key_by_name(self, db, SCHEMA_DELETED_SITES)  # keyed by name and version for a while
            site_regions.compose(self, db)  # an earlier release's decomposed regions
            schema_version.stamp(self, db, found)
            # Where WAL cannot be had (a file system without shared memory), COMMIT waits for
            # readers of the file like BEGIN does for writers; inside the transaction nothing
            # else waits (SQLite does not spill its cache while it cannot lock the file).
            _patiently(db, "COMMIT", (), self._closing)
        except StoreError:
            db.close()  # rolled back with it
            raise
        except sqlite3.Error as exc:  # not a database, unreadable, a full disk: rolled back with the connection
            db.close()
            hint = " (not an edgeplane state file: restore it from a backup, or give another --data-dir/--store)" \
                if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc) else ""
            raise StoreError(f"cannot open the SQLite store {self.path}: {exc}{hint}") from None
        return db

    def close(self, wait_s: float = 1.0) -> None:
        """Refuse new calls, drop the queued ones and close the file. A call waiting for
        another process's lock gives up within :data:`BUSY_TURN_S`; one still running a
        statement after ``wait_s`` is interrupted (it fails, its transaction rolled back), so
        the server stops, and its process exits, without waiting out :data:`BUSY_TIMEOUT_S`."""
        self.threads.close()
        self._closing.set()
        self.event_sites.close(0)  # no other batch; the one under way ends with the calls below
        if not self._lock.acquire(wait_s):
            self._db.interrupt()
            self._lock.acquire()
        try:
            self._db.close()
            self._disown()
        finally:
            self._lock.release()

    def _disown(self) -> None:
        fd, self._owner_fd = self._owner_fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with it

    @contextlib.contextmanager
    def _tx(self, commit: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``commit=False`` rolls it back at the end (a dry run). A
        write SQLite refuses (a full disk, an I/O error) is rolled back whole and raised as
        :class:`StoreError` (see :func:`_failed`), never half applied."""
        with self._lock:
            try:
                _patiently(self._db, "BEGIN IMMEDIATE", (), self._closing)
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc
            try:
                yield self._db
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._failed(exc) from exc
                raise
            else:
                try:
                    _patiently(self._db, "COMMIT" if commit else "ROLLBACK", (), self._closing)  # a COMMIT refused busy stays to retry
                except (sqlite3.Error, StoreError) as exc:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    if isinstance(exc, StoreError):  # closing
                        raise
                    raise self._failed(exc) from exc

    def _failed(self, exc: sqlite3.Error) -> StoreError:
        return _refused(exc, f"the SQLite store {self.path} refused the operation: {exc}; nothing was changed")

    def _lease_now(self, db: sqlite3.Connection) -> float:
        return self._clock()  # one machine: its processes share this clock

    def _next_version(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'resource_version'")
        return int(db.execute("SELECT value FROM meta WHERE key = 'resource_version'").fetchone()[0])

    def next_sequences(self, key: str, count: int, lease: Lease | None = None, above: int = 0) -> range:
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", (f"seq:{key}",))
            db.execute("UPDATE meta SET value = MAX(value, ?) + ? WHERE key = ?", (above, max(1, count), f"seq:{key}"))
            last = int(db.execute("SELECT value FROM meta WHERE key = ?", (f"seq:{key}",)).fetchone()[0])
        return range(last - max(1, count) + 1, last + 1)

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return _patiently(self._db, sql, args, self._closing).fetchall()
            except sqlite3.Error as exc:
                raise _refused(exc, f"the SQLite store {self.path} could not be read: {exc}") from exc

    def _read_lock(self) -> contextlib.AbstractContextManager[Any]:
        return self._lock

    def _many(self, db: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        db.executemany(sql, rows)
