"""Which events a read of the event log keeps: the statements of
:meth:`orchestrator.store.sql.SqlStore.events` and ``recent_events`` for a kind, a name, a
site and a time window, and which sites an event names (:func:`sites_named`, kept in the
table ``event_sites`` that a read by site goes through: :mod:`orchestrator.store.event_sites`).
Apart from the SQL store's I/O: what matches is decided here, from the arguments alone;
both backends run it as it is (``?`` placeholders, the dialect's own).
"""

from __future__ import annotations

from typing import Any

from orchestrator.store import values

#: The ``meta`` key: every event up to this id has its sites in ``event_sites`` (those this
#: release logged, and those :func:`orchestrator.store.event_sites.index` read since).
THROUGH = "event_sites_through"
_INDEXED_THROUGH = f"(SELECT value FROM meta WHERE key = '{THROUGH}')"


def select(since: int | None, limit: int, kind: str | None = None, name: str | None = None, site: str | None = None,
           after: float | None = None, before: float | None = None, contains: str = "instr(details, ?) > 0") -> tuple[str, list[Any]]:
    """The statement (and its arguments) that reads up to ``limit`` events after event
    ``since``, oldest first, or with ``since`` None the newest ``limit``, newest first, of
    ``kind`` and ``name``, at ``site``, logged in [``after``, ``before``) when given.

    At a site, the events up to :data:`THROUGH` are read through ``event_sites`` by its key
    (site, event id): a site's events in id order without reading any other's, however long
    the log. Those after it, which may not be indexed yet (a store kept from before the
    table, while it is indexed in the background after the start; an earlier release's
    replica logging during a rolling update), are read by what their details say
    (:func:`named`): the same events, read by a scan of those alone, so a read is exact at
    any point of the indexing. ``contains``: the dialect's test that ``details`` holds a text
    (``?``), taken as it is, with no wildcards and matching case."""
    clauses, args = where(kind, name, after, before)
    order = "DESC" if since is None else ""
    if site:
        bound, after_since = ("", []) if since is None else (" AND s.event_id > ?", [since])
        indexed = (f"SELECT e.* FROM event_sites s JOIN events e ON e.id = s.event_id WHERE s.site = ?{bound} "
                   f"AND s.event_id <= {_INDEXED_THROUGH}{clauses} ORDER BY s.event_id {order} LIMIT ?")
        test, texts = named(site, contains)
        rest = (f"SELECT * FROM events WHERE id > {_INDEXED_THROUGH}{bound.replace('s.event_id', 'id')}{clauses} AND {test} "
                f"ORDER BY id {order} LIMIT ?")
        return (f"SELECT * FROM ({indexed}) AS indexed UNION ALL SELECT * FROM ({rest}) AS unindexed ORDER BY id {order} LIMIT ?",
                [site, *after_since, *args, limit, *after_since, *args, *texts, limit, limit])
    bound = "TRUE" if since is None else "id > ?"
    return f"SELECT * FROM events WHERE {bound}{clauses} ORDER BY id {order} LIMIT ?", [*([] if since is None else [since]), *args, limit]


def named(site: str, contains: str) -> tuple[str, list[Any]]:
    """The condition (and its arguments) that keeps the events at ``site`` by what they say,
    as :func:`sites_named` finds them: a Site's own, and those whose details (canonical JSON:
    :func:`orchestrator.store.values.canonical`) hold ``"site":"<site>"``, ``"from":…`` or
    ``"to":…``, quotes included, so a name matches whole."""
    texts = [values.canonical({key: site})[1:-1] for key in SITE_DETAILS]
    return f"((kind = ? AND name = ?) OR {' OR '.join(contains for _ in texts)})", ["Site", site, *texts]


def where(kind: str | None, name: str | None, after: float | None = None, before: float | None = None) -> tuple[str, list[Any]]:
    """The ``AND …`` clauses (and their arguments) that keep the events of ``kind`` and
    ``name``, logged at ``after`` or later and before ``before`` (epoch seconds) when given."""
    clauses, args = "", []
    for column, value in (("kind", kind), ("name", name)):
        if value:
            clauses, args = f"{clauses} AND {column} = ?", [*args, value]
    for clause, value in ((" AND ts >= ?", after), (" AND ts < ?", before)):
        if value is not None:
            clauses, args = clauses + clause, [*args, value]
    return clauses, args


def sites_named(kind: str, name: str, details: Any) -> set[str]:
    """The sites an event happened at: a Site's own events' (lost, cordoned, a failback), and
    each that its details name, at any depth, as a replica's ``site`` or a move's ``from`` or
    ``to`` (a drain's moves are a list of them). Whole names only: ``edge-lyon`` is not
    ``edge-lyon-2``."""
    found = {name} if kind == "Site" and name else set()
    stack = [details]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, inner in value.items():
                if key in SITE_DETAILS and isinstance(inner, str) and inner:
                    found.add(inner)
                elif isinstance(inner, (dict, list)):
                    stack.append(inner)
        elif isinstance(value, list):
            stack.extend(v for v in value if isinstance(v, (dict, list)))
    return found


#: The keys of an event's details that name the site it happened at (:func:`sites_named`).
SITE_DETAILS = ("site", "from", "to")
