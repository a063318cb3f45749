"""Which events a read of the event log keeps: the ``WHERE`` clauses of
:meth:`orchestrator.store.sql.SqlStore.events` and ``recent_events`` for a kind, a name, a
site and a time window. Apart from the SQL store's I/O: what matches is decided here, from
the arguments alone; both backends run it as it is (``?`` placeholders, the dialect's own).
"""

from __future__ import annotations

from typing import Any

from orchestrator.store import values


def where(kind: str | None, name: str | None, site: str | None = None, after: float | None = None,
          before: float | None = None) -> tuple[str, list[Any]]:
    """The ``AND …`` clauses (and their arguments) that keep the events of ``kind`` and
    ``name``, and those at ``site``: the Site's own (lost, cordoned, a failback) and those
    whose details name it as a replica's ``site``, or a move's ``from`` or ``to`` (details
    are stored as canonical JSON: :func:`orchestrator.store.values.canonical`). ``site`` is
    a site name, a DNS label, which holds none of LIKE's wildcards. ``after`` and ``before``
    bound when it was logged (epoch seconds, ``after`` included)."""
    clauses, args = "", []
    for column, value in (("kind", kind), ("name", name)):
        if value:
            clauses, args = f"{clauses} AND {column} = ?", [*args, value]
    if site:
        named = [f"%{values.canonical({key: site})[1:-1]}%" for key in SITE_DETAILS]
        clauses += f" AND ((kind = ? AND name = ?) OR {' OR '.join('details LIKE ?' for _ in named)})"
        args = [*args, "Site", site, *named]
    for clause, value in ((" AND ts >= ?", after), (" AND ts < ?", before)):
        if value is not None:
            clauses, args = clauses + clause, [*args, value]
    return clauses, args


#: The keys of an event's details that name the site it happened at (:func:`where`).
SITE_DETAILS = ("site", "from", "to")
