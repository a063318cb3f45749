"""The sites each event names, kept apart from the event log so a read by site
(``GET /v1/events?site=``, ``describe site``, ``events -w --site``) goes by an index.

Why a table of its own: an event names a site in its details (a replica's ``site``, a move's
``from`` and ``to``, a drain's list of moves), kept as JSON text, and reading them there was a
``LIKE`` over every event's details: the whole retained log, at each poll of a quiet site.
``event_sites`` holds one row per site an event names (:func:`orchestrator.store.eventquery.sites_named`),
keyed by (site, event id), so a site's events are one range of that key, and a name matches
whole (``edge-lyon`` is not ``edge-lyon-2``).

Who fills it: this release, as it logs each event (:func:`record`, in the event's
transaction). Events it did not log, those a store kept from before this table and those a
replica of an earlier release logs beside this one during a rolling update (it writes the
events row alone, as it always did, and still can), are indexed in order by :func:`index`:
batch by batch after each start, until caught up, in the background (:class:`Backfill`), and
at each of the leader's retention passes (every minute), the ``meta`` key :data:`THROUGH`
saying how far it got. Indexing an event twice changes nothing. Retention deletes an event's
rows with it (:func:`forget`).

Why in the background: a store kept for years holds millions of events, and indexing them
takes minutes of CPU (14-19 s for 200,000 on SQLite, 18 s on PostgreSQL); before the store
opened, the control plane started that much later, during a rolling update of its replicas.
A read by site stays exact meanwhile: it reads the events after :data:`THROUGH` by what their
details say (:func:`orchestrator.store.eventquery.select`), as a read by site did before this
table, over the part of the log not yet indexed alone.

Each function runs through the hooks of ``store``, the backend (its transaction, placeholder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.store import eventquery
from orchestrator.store.values import StoreError

if TYPE_CHECKING:
    from orchestrator.store.sql import SqlStore

log = logging.getLogger(__name__)

THROUGH = eventquery.THROUGH  # the ``meta`` key: every event up to this id was indexed by :func:`index`

#: The table and its index on the event ids (retention's deletes), for both backends
#: (``{id}``: the dialect's type of an event id); a store made before them gains them on start.
SCHEMA = """
CREATE TABLE IF NOT EXISTS event_sites (site TEXT NOT NULL, event_id {id} NOT NULL, PRIMARY KEY (site, event_id));
CREATE INDEX IF NOT EXISTS event_sites_event ON event_sites (event_id);
INSERT INTO meta (key, value) VALUES ('""" + THROUGH + """', 0) ON CONFLICT (key) DO NOTHING
"""

#: How many events one transaction of :func:`index` reads (~0.1 s of CPU): the store's other
#: calls, and on PostgreSQL the writes of every replica, the leader's lease renewal among
#: them, wait for one batch at most.
BATCH = 1000

PROGRESS_S = 10.0  # how often a backfill under way says how far it got
RETRY_S = 5.0  # how long a backfill that failed (the database unreachable) waits before it tries again

_INSERT = "INSERT INTO event_sites (site, event_id) VALUES (?, ?) ON CONFLICT (site, event_id) DO NOTHING"


def record(store: SqlStore, db: Any, event_id: int, kind: str, name: str, details: Any) -> None:
    """Inside the transaction that logs event ``event_id``: the sites it names."""
    sites = eventquery.sites_named(kind, name, details)
    if sites:
        store._many(db, store._q(_INSERT), [(site, event_id) for site in sorted(sites)])


def index(store: SqlStore, batch: int = BATCH) -> int:
    """Index the next ``batch`` events after :data:`THROUGH`, in one transaction; how many
    were read (0: caught up)."""
    with store._tx() as db:
        through = int(store._one(db, "SELECT value FROM meta WHERE key = ?", (THROUGH,))["value"])
        rows = db.execute(store._q("SELECT id, kind, name, details FROM events WHERE id > ? ORDER BY id LIMIT ?"),
                          (through, max(1, batch))).fetchall()
        named = [(site, r["id"]) for r in rows for site in sorted(eventquery.sites_named(r["kind"], r["name"], _details(r["details"])))]
        if named:
            store._many(db, store._q(_INSERT), named)
        if rows:
            db.execute(store._q("UPDATE meta SET value = ? WHERE key = ? AND value < ?"), (rows[-1]["id"], THROUGH, rows[-1]["id"]))
    return len(rows)


def behind(store: SqlStore) -> int:
    """How many events are after :data:`THROUGH`, not yet read by :func:`index`."""
    return int(store._fetch(store._q("SELECT COUNT(*) AS n FROM events WHERE id > (SELECT value FROM meta WHERE key = ?)"),
                            (THROUGH,))[0]["n"])


#: What lets a store's backfill run: entered with the backfill's stop event, it yields
#: whether this store has the turn (on PostgreSQL, one replica at a time), False once stopped.
Turn = Callable[[threading.Event], contextlib.AbstractContextManager[bool]]


class Backfill:
    """:func:`index` in a thread of its own, from a store's start until caught up: the events
    a store kept from before ``event_sites`` are indexed while it already answers. Between two
    batches it waits as long as the last one took, so it holds the store's connection (and on
    PostgreSQL the write lock) half the time at most; it stops at the next batch once closed,
    and the next start goes on from :data:`THROUGH`. ``index_batch``: what reads a batch
    (:func:`index`; a test's, to hold it). ``turn``: see :data:`Turn`."""

    def __init__(self, store: SqlStore, turn: Turn | None = None, index_batch: Callable[[SqlStore, int], int] | None = None,
                 batch: int = BATCH) -> None:
        self.store = store
        self.batch = batch
        self.read = 0  # events read so far
        self.left: int | None = None  # events to read, as counted when it began (None: not yet)
        self._turn = turn if turn is not None else (lambda stop: contextlib.nullcontext(True))
        self._index = index_batch if index_batch is not None else index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-event-sites", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Whether it ended (caught up, or stopped) within ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def remaining(self) -> int:
        """Events this backfill still has to read, as counted when it began; 0 once it ended or
        while another replica has the turn."""
        return max(0, (self.left or 0) - self.read) if self._thread.is_alive() else 0

    def close(self, timeout_s: float = 1.0) -> None:
        """Start no other batch; wait up to ``timeout_s`` for the one under way (the store's
        close waits for none: it ends the one under way as it ends any call)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._turn(self._stop) as mine:
                    if mine:
                        self._catch_up()
                return
            except StoreError as e:
                if self._stop.is_set():
                    return
                log.warning("indexing the sites events name stopped (%s); trying again in %.0f s", e, RETRY_S)
                if self._stop.wait(RETRY_S):
                    return
            except Exception:  # not the store's: a fault, with its traceback; reads by site stay exact without the index
                log.exception("indexing the sites events name failed; the next start tries again")
                return

    def _catch_up(self) -> None:
        self.left = left = behind(self.store)
        said = began = time.monotonic()
        loud = left > self.batch  # a store kept from before event_sites, not the events of the last minute
        if loud:
            log.info("indexing the sites of %d events logged before this release, in the background "
                     "(reads by site are exact meanwhile, slower)", left)
        while not self._stop.is_set():
            started = time.monotonic()
            read = self._index(self.store, self.batch)
            self.read += read
            if not read:
                if loud:
                    log.info("indexed the sites of %d events in %.1f s", self.read, time.monotonic() - began)
                return
            if loud and time.monotonic() - said >= PROGRESS_S:
                said = time.monotonic()
                log.info("indexing the sites of events: %d of %d done", self.read, left)
            self._stop.wait(time.monotonic() - started)
        if loud:
            log.info("indexing the sites of events stopped at %d of %d (the store closed); the next start goes on from there",
                     self.read, left)


def forget(store: SqlStore, db: Any, ids: str, args: Sequence[Any]) -> None:
    """Inside retention's transaction, before it deletes the events ``ids`` selects (a
    subquery, with ``args``): the sites they named."""
    db.execute(store._q(f"DELETE FROM event_sites WHERE event_id IN ({ids})"), args)


def _details(text: str) -> Any:
    """An event's details as stored; what is no JSON (none this store writes) names no site.
    Details that hold none of the keys (most: applies, tokens) are not decoded at all."""
    if not any(f'"{key}":' in text for key in eventquery.SITE_DETAILS):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
