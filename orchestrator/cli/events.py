"""``edgeplane events``: the audit/event log, read once or followed (``-w``).

Following is the one client command that keeps asking: it outlives a control plane that
restarts or says to retry later, so the waiting and the asking again are here, apart from
the commands that ask once and report what they got.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.cli import render
from orchestrator.cli.http import ApiClient, CliError, RetryLater, TlsFailure


def cmd_events(api: ApiClient, args: argparse.Namespace) -> int:
    window = {"site": args.site, "after": args.after, "before": args.before}
    if args.follow:
        return follow_events(api, args.output, args.limit, args.since, args.kind, args.name, **window)
    return show_events(api, args.output, args.limit, args.since, args.kind, args.name, **window)


EVENT_COLUMNS = ["ID", "TIME", "ACTOR", "ACTION", "KIND", "NAME", "SITE", "REASON"]
#: The columns of an object's own events in ``describe`` (its kind and name are the object's).
OBJECT_EVENT_COLUMNS = ["ID", "TIME", "ACTOR", "ACTION", "SITE", "REASON"]


def _event_row(e: dict[str, Any], reason_width: int | None = None) -> list[Any]:
    return [e["id"], e.get("ts", ""), e["actor"], e["action"], e["kind"], e["name"], event_site(e), e["reason"][:reason_width]]


def object_event_row(e: dict[str, Any]) -> list[Any]:
    """One of an object's events as ``describe`` lists them (:data:`OBJECT_EVENT_COLUMNS`)."""
    return [e["id"], e.get("ts", ""), e["actor"], e["action"], event_site(e), e["reason"]]


def described_events(kind: Any, name: Any, found: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The columns and rows of the events ``describe`` lists for the object ``kind`` ``name``:
    its own need no kind or name (:data:`OBJECT_EVENT_COLUMNS`); once some are another
    object's (a Site lists its replicas' placements and moves, logged under their
    deployment), every row names its kind and name (:data:`EVENT_COLUMNS`)."""
    if all((e.get("kind"), e.get("name")) == (kind, name) for e in found):
        return OBJECT_EVENT_COLUMNS, [object_event_row(e) for e in found]
    return EVENT_COLUMNS, [_event_row(e) for e in found]


def event_site(e: dict[str, Any]) -> str:
    """Where an event happened, from its details: a move's ``from->to``, a placement's or
    removal's site; "" for an event of no one site (an apply, a token)."""
    details = e.get("details")
    if not isinstance(details, dict):
        return ""
    if details.get("from") and details.get("to"):
        return f"{details['from']}->{details['to']}"
    site = details.get("site")
    return str(site) if site else ""


def _events_query(limit: int, since: int | None, kind: str | None, name: str | None, site: str | None = None,
                  after: str | None = None, before: str | None = None) -> dict[str, str]:
    params = {"since": str(since), "limit": str(limit)} if since is not None else {"last": str(limit)}
    return params | {k: v for k, v in (("kind", kind), ("name", name), ("site", site), ("after", after), ("before", before)) if v}


def follow_events(api: ApiClient, output: str, limit: int = 50, since: int | None = None, kind: str | None = None,
                  name: str | None = None, every_s: float = 1.0, *, site: str | None = None, after: str | None = None,
                  before: str | None = None) -> int:
    """The newest events (or those after ``since``), then each new one as it is logged, one
    line each (``-o json``: one JSON object a line), until interrupted. What to ask next, what
    to say on stderr and how long to wait are :func:`answered` and :func:`unanswered`'s; this
    loop only asks, prints and sleeps. The table's header waits for the first answer: a
    follow refused at once (a token refused, TLS that fails) leaves stdout empty, as a
    script reading it must find it."""
    reason_width = 70 if sys.stdout.isatty() else None  # piped: whole, as tables are
    state = Follow(limit, since, check_pruned=since is not None)
    headed = output != "table"
    while True:
        try:
            answer = api.request("GET", "/v1/events", params=_events_query(state.page_size, state.since, kind, name, site, after, before))
        except CliError as exc:
            wait = wait_to_ask_again(exc, every_s)
            if wait is None:  # refused, not away: asking again would be refused again
                raise
            step = unanswered(state, f"{exc} (HTTP {exc.status})" if isinstance(exc, RetryLater) else str(exc), wait)
        else:
            step = answered(state, Page.from_json(answer), every_s)
            if not headed:
                print("\t".join(EVENT_COLUMNS))
                headed = True
        for line in step.said:
            print(line, file=sys.stderr, flush=True)
        for e in step.shown:
            if output == "table":
                print("\t".join(render.one_line(c) for c in _event_row(e, reason_width)))
            elif output == "json":
                print(render.json_text(e, sort_keys=True, ascii_only=not render.holds_text(sys.stdout)))
            else:
                print("---")
                render.dump(e, "yaml")
        sys.stdout.flush()
        state = step.state
        if step.wait_s:
            time.sleep(step.wait_s)


#: how many events a follow asks for at once after its first answer
PAGE = 1000


@dataclass(frozen=True)
class Follow:
    """What a follow has seen, which decides what it asks next and what it says."""

    limit: int  # --limit: how many of a store's newest events are shown first
    since: int | None = None  # the id the next ask is after; None: the newest ``limit``
    first: bool = True  # the next ask is the first of this store's (``limit`` events, not a PAGE)
    store: str | None = None  # the store the ids read so far are from (None: not said yet)
    # the newest pruned id that loses nothing unsaid: one said, or one pruned before an answer
    # of a store's newest events (which were all there was to follow then)
    pruned_known: int = 0
    # whether the next answer's prunedThrough is said: after an id the caller chose (--since),
    # or after the control plane was away (events logged meanwhile may age out before it answers)
    check_pruned: bool = False
    away: bool = False  # the last ask got no answer
    # the time (ts) of the last event shown (None: none shown yet); once the store went back,
    # its events up to then (the backup's, shown before) are not shown again
    last_ts: str | None = None
    shown_after: str | None = None  # the next answer (a page of the newest) shows only events later than this ts

    @property
    def page_size(self) -> int:
        return self.limit if self.first and self.shown_after is None else PAGE


@dataclass(frozen=True)
class Page:
    """One answer of ``GET /v1/events``."""

    items: tuple[dict[str, Any], ...]
    store: str | None = None  # None: a control plane older than ``store``
    pruned_through: int = 0
    last_id: int | None = None  # the store's newest event id; None: a control plane older than ``lastId``

    @classmethod
    def from_json(cls, answer: dict[str, Any]) -> Page:
        last_id = answer.get("lastId")
        return cls(tuple(answer["items"]), answer.get("store"), int(answer.get("prunedThrough") or 0),
                   int(last_id) if last_id is not None else None)


@dataclass(frozen=True)
class Step:
    """What a follow does after one ask: say ``said`` on stderr, print ``shown``, wait ``wait_s`` (0: ask again at once)."""

    state: Follow
    said: tuple[str, ...] = ()
    shown: tuple[dict[str, Any], ...] = ()
    wait_s: float = 0.0


def unanswered(state: Follow, problem: str, wait_s: float) -> Step:
    """No answer (``problem``; asked again in ``wait_s``): a control plane that cannot be
    reached (restarting, say) or says to retry later (503 while its store does not answer, a
    reverse proxy's 502/503/504 while it restarts, 429) is said once, and waited for."""
    said = () if state.away else (f"warning: {problem}; asking again every {wait_s:g}s",)
    return Step(dataclasses.replace(state, away=True, check_pruned=state.since is not None), said, wait_s=wait_s)


def answered(state: Follow, page: Page, every_s: float) -> Step:
    """An answer: its events are shown, and the next ask is after the last of them.

    Event ids count from each store's own start: a control plane back on another store (its
    ``store`` changed) is said once, and followed from that store's newest events, not from an
    id of the last one. When its retention deleted events after the id asked from
    (``prunedThrough``; ``--since`` an old id, say), that is said once, and what was kept
    follows. That is asked only of the first answer after ``--since`` or after the control
    plane was away: ``prunedThrough`` counts every kind, so a later poll, asking after the
    newest event of ``--kind``/``--name``, would be told of other events retention deleted
    since, none of which it follows; nor is what it deleted before an answer of the newest
    events, which were all there was to follow.

    A store whose newest id (``lastId``) is below the id asked after went back (restored from
    an older backup, keeping its ``store``): the ids it hands out now were read before, from
    the lost events. That is said once, and its newest events are asked for at once, of which
    only those logged since the last shown (by time, to the second) are shown: the backup's were."""
    said = ("the control plane answers again; following",) if state.away else ()
    if state.store is not None and page.store is not None and page.store != state.store:
        said += (f"the control plane now reads another store ({page.store}, was {state.store}); following its newest events",)
        # its events came after an id of the other store: asked again at once, for this one's newest
        return Step(Follow(state.limit, store=page.store), said)
    if state.last_ts is not None and state.since is not None and page.last_id is not None and page.last_id < state.since:
        said += (f"warning: the control plane's store went back (restored from a backup?): its newest event is id "
                 f"{page.last_id}, before id {state.since} already read; following its events logged since",)
        return Step(Follow(state.limit, store=page.store or state.store, shown_after=state.last_ts), said)
    items = page.items
    if state.shown_after is not None:
        # to the second: one of the same second as the last shown is shown, rather than lost
        items = tuple(e for e in items if str(e.get("ts", "")) >= state.shown_after)
    pruned_known = state.pruned_known
    if state.since is None:  # the newest events: what retention deleted before them is none this follow shows
        pruned_known = page.pruned_through
    elif state.check_pruned and page.pruned_through > max(state.since, state.pruned_known):
        said += (f"warning: events before id {page.pruned_through + 1} were pruned past their retention, some after id "
                 f"{state.since} may be missing; going on from the oldest kept",)
        pruned_known = page.pruned_through
    since = page.items[-1]["id"] if page.items else (state.since or 0)
    if state.since is None and page.last_id is not None:
        # the newest events, of a --site, --kind or --name: those after them up to the store's
        # newest id (read before them) are none of its, so the next ask is after that id, not
        # after the last shown (or, none shown, every event from the first)
        since = max(since, page.last_id)
    last_ts = items[-1].get("ts") if items else state.last_ts
    after = Follow(state.limit, since, first=False, store=page.store or state.store, pruned_known=pruned_known, last_ts=last_ts)
    return Step(after, said, items, every_s)


#: the longest a Retry-After is honoured while following: a server asking for more would leave the follow silent
MAX_RETRY_AFTER_S = 60.0


def wait_to_ask_again(exc: CliError, every_s: float) -> float | None:
    """How long to wait before asking again after ``exc``, or None when asking again cannot
    help: a refusal, or TLS that fails for good (a certificate not trusted, a server that
    speaks no TLS), which says nothing of a control plane restarting."""
    if isinstance(exc, RetryLater):
        return min(max(every_s, exc.retry_after_s or 0.0), MAX_RETRY_AFTER_S)
    return every_s if exc.code == 3 and not isinstance(exc, TlsFailure) else None


def show_events(api: ApiClient, output: str, limit: int = 50, since: int | None = None, kind: str | None = None,
                name: str | None = None, *, site: str | None = None, after: str | None = None, before: str | None = None) -> int:
    """The newest ``limit`` events, or with ``since`` the first ``limit`` after that one; oldest first;
    of ``kind``, named ``name``, at ``site``, logged in [``after``, ``before``) when given."""
    data = api.request("GET", "/v1/events", params=_events_query(limit, since, kind, name, site, after, before))
    if output in ("json", "yaml"):
        render.dump(data, output)
        return 0
    render.table(None, EVENT_COLUMNS, [_event_row(e) for e in data["items"]])
    return 0
