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
batch by batch at each start, until caught up, and at each of the leader's retention passes
(every minute), the ``meta`` key :data:`THROUGH` saying how far it got. Indexing an event
twice changes nothing. Retention deletes an event's rows with it (:func:`forget`).

Each function runs through the hooks of ``store``, the backend (its transaction, placeholder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.store import eventquery

if TYPE_CHECKING:
    from orchestrator.store.sql import SqlStore

THROUGH = "event_sites_through"  # the ``meta`` key: every event up to this id was indexed by :func:`index`

#: The table and its index on the event ids (retention's deletes), for both backends
#: (``{id}``: the dialect's type of an event id); a store made before them gains them on start.
SCHEMA = """
CREATE TABLE IF NOT EXISTS event_sites (site TEXT NOT NULL, event_id {id} NOT NULL, PRIMARY KEY (site, event_id));
CREATE INDEX IF NOT EXISTS event_sites_event ON event_sites (event_id);
INSERT INTO meta (key, value) VALUES ('""" + THROUGH + """', 0) ON CONFLICT (key) DO NOTHING
"""

#: How many events one transaction of :func:`index` reads: short enough that the writes of
#: other replicas, the leader's lease renewal among them, wait for one batch at most.
BATCH = 5000

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


def catch_up(store: SqlStore) -> int:
    """:func:`index` until every event is (at a start); how many were read."""
    read = total = index(store)
    while read:
        read = index(store)
        total += read
    return total


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
