"""Which releases may use a store: the mark each store carries of its schema.

Why: replicas of two releases share one database during a rolling update, and after a
rollback an earlier release opens a store a later one brought up to date. So far every
change of the schema only added (tables, columns, indexes, never another key for a table an
earlier release writes), so any release could use any store. A change that cannot be made
so needs the releases before it to stop using the store, and they can only do that if the
store says so: it carries, in ``meta``, the schema generation that last brought it up to
date (:data:`WRITTEN_BY`) and the oldest generation that may still read and write it
(:data:`USABLE_FROM`). A control plane older than that refuses to start, having written
nothing. Releases before the mark kept none: their store is brought up to date and stamped.

The check and the stamp run inside the schema transaction, under the write lock every
writer takes, so replicas of two releases starting together see one another's mark. The
mark never goes down: a release that may still use a store a later one made leaves that
later one's mark as it is (the schema is the later one's).

Each function runs inside the caller's transaction (``db``), through the hooks of ``store``,
the backend (its placeholder, its name in messages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.store.values import StoreError

if TYPE_CHECKING:
    from orchestrator.store.sql import SqlStore

#: This release's schema generation: raised by one at each release whose schema changes.
GENERATION = 1
#: The oldest generation that reads and writes the schema as this release leaves it. Raised
#: (to :data:`GENERATION`) only by a change an earlier release could not live with: the
#: releases before it then refuse the store, once this one has opened it.
OLDEST_USER = 1

WRITTEN_BY = "schema_generation"  # the ``meta`` keys of the mark
USABLE_FROM = "schema_usable_from"


@dataclass(frozen=True)
class Mark:
    written_by: int
    usable_from: int


def refusal(found: Mark | None, where: str) -> str | None:
    """Why this release may not use the store at ``where`` that carries ``found`` (None: no
    mark, a store of a release before it); None when it may."""
    if found is None or found.usable_from <= GENERATION:
        return None
    return (f"the store {where} was last brought up to date by a newer edgeplane (schema generation {found.written_by}), "
            f"which no control plane before schema generation {found.usable_from} may use; this one is generation "
            f"{GENERATION}: upgrade it to that release or a later one "
            "(or restore the store from a backup taken before that release first started on it)")


def stamped(found: Mark | None) -> Mark:
    """The mark the store carries once this release brought it up to date: never lower than ``found``."""
    if found is None:
        return Mark(GENERATION, OLDEST_USER)
    return Mark(max(found.written_by, GENERATION), max(found.usable_from, OLDEST_USER))


def check(store: SqlStore, db: Any, has_meta: bool) -> Mark | None:
    """Inside the schema transaction, before anything is written: the store's mark (None
    when it has none, or no ``meta`` table yet); :class:`StoreError` when this release may
    not use it."""
    if not has_meta:
        return None
    rows = {r["key"]: int(r["value"]) for r in db.execute(store._q("SELECT key, value FROM meta WHERE key IN (?, ?)"),
                                                          (WRITTEN_BY, USABLE_FROM)).fetchall()}
    found = Mark(rows[WRITTEN_BY], rows.get(USABLE_FROM, rows[WRITTEN_BY])) if WRITTEN_BY in rows else None
    if (why := refusal(found, store.path)) is not None:
        raise StoreError(why)
    return found


def stamp(store: SqlStore, db: Any, found: Mark | None) -> None:
    """Inside the schema transaction, once the schema is up to date: the mark :func:`stamped` says."""
    mark = stamped(found)
    if mark == found:
        return
    for key, value in ((WRITTEN_BY, mark.written_by), (USABLE_FROM, mark.usable_from)):
        db.execute(store._q("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
                   (key, value))
