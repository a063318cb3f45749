"""``edgeplane events``: the audit/event log, read once or followed (``-w``).

Following is the one client command that keeps asking: it outlives a control plane that
restarts or says to retry later, so the waiting and the asking again are here, apart from
the commands that ask once and report what they got.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from orchestrator.cli import render
from orchestrator.cli.http import ApiClient, CliError, RetryLater


def cmd_events(api: ApiClient, args: argparse.Namespace) -> int:
    if args.follow:
        return follow_events(api, args.output, args.limit, args.since, args.kind, args.name)
    return show_events(api, args.output, args.limit, args.since, args.kind, args.name)


EVENT_COLUMNS = ["ID", "ACTOR", "ACTION", "KIND", "NAME", "REASON"]


def _event_row(e: dict[str, Any], reason_width: int | None = None) -> list[Any]:
    return [e["id"], e["actor"], e["action"], e["kind"], e["name"], e["reason"][:reason_width]]


def _events_query(limit: int, since: int | None, kind: str | None, name: str | None) -> dict[str, str]:
    params = {"since": str(since), "limit": str(limit)} if since is not None else {"last": str(limit)}
    return params | {k: v for k, v in (("kind", kind), ("name", name)) if v}


def follow_events(api: ApiClient, output: str, limit: int = 50, since: int | None = None, kind: str | None = None,
                  name: str | None = None, every_s: float = 1.0) -> int:
    """The newest events (or those after ``since``), then each new one as it is logged, one
    line each (``-o json``: one JSON object a line), until interrupted. A control plane that
    cannot be reached (restarting, say) or says to retry later (503 while its store does not
    answer, a reverse proxy's 502/503/504 while it restarts, 429 as long as its Retry-After
    says, up to a minute) is waited for, said once on stderr; the events logged meanwhile
    follow when it answers again. Event ids count from each store's own start: a control plane
    back on another store (its ``store`` changed) is said once on stderr and followed from
    that store's newest events, not from an id of the last one. When its retention deleted
    events after the id asked from (``prunedThrough``; ``--since`` an old id, say), that is
    said once on stderr, and what was kept follows. That is asked only of the first answer
    after ``--since`` or after the control plane was away: ``prunedThrough`` counts every
    kind, so a later poll, asking after the newest event of ``--kind``/``--name``, would be
    told of other events retention deleted since, none of which it follows."""
    params = _events_query(limit, since, kind, name)
    if output == "table":
        print("\t".join(EVENT_COLUMNS), flush=True)
    reason_width = 70 if sys.stdout.isatty() else None  # piped: whole, as tables are
    away = False
    store: str | None = None  # the store the ids read so far are from (None: not said yet)
    pruned_said = 0  # the last id said to be pruned
    check_pruned = since is not None  # an id the caller chose, not the newest one read
    while True:
        try:
            answer = api.request("GET", "/v1/events", params=params)
        except CliError as exc:
            wait = _wait_to_ask_again(exc, every_s)
            if wait is None:  # refused, not away: asking again would be refused again
                raise
            if not away:
                said = f"{exc} (HTTP {exc.status})" if isinstance(exc, RetryLater) else str(exc)
                print(f"warning: {said}; asking again every {wait:g}s", file=sys.stderr, flush=True)
            away, check_pruned = True, "since" in params  # events logged meanwhile may age out before it answers
            time.sleep(wait)
            continue
        if away:
            print("the control plane answers again; following", file=sys.stderr, flush=True)
            away = False
        items, answered_from = answer["items"], answer.get("store")  # no store: a control plane older than it
        if store is not None and answered_from is not None and answered_from != store:
            print(f"the control plane now reads another store ({answered_from}, was {store}); following its newest events",
                  file=sys.stderr, flush=True)
            store, params, pruned_said, check_pruned = answered_from, _events_query(limit, None, kind, name), 0, False
            continue  # these came after an id of the other store
        store = answered_from or store
        pruned = int(answer.get("prunedThrough") or 0)
        if check_pruned and pruned > max(int(params["since"]), pruned_said):
            print(f"warning: events before id {pruned + 1} were pruned past their retention, some after id {params['since']} "
                  "may be missing; going on from the oldest kept", file=sys.stderr, flush=True)
            pruned_said = pruned
        check_pruned = False
        for e in items:
            if output == "table":
                print("\t".join(str(c) for c in _event_row(e, reason_width)))
            elif output == "json":
                print(render.json_text(e, sort_keys=True))
            else:
                print("---")
                render.dump(e, "yaml")
        sys.stdout.flush()
        last = items[-1]["id"] if items else int(params.get("since", "0"))
        params = _events_query(1000, last, kind, name)
        time.sleep(every_s)


#: the longest a Retry-After is honoured while following: a server asking for more would leave the follow silent
MAX_RETRY_AFTER_S = 60.0


def _wait_to_ask_again(exc: CliError, every_s: float) -> float | None:
    """How long to wait before asking again after ``exc``, or None when asking again cannot help."""
    if isinstance(exc, RetryLater):
        return min(max(every_s, exc.retry_after_s or 0.0), MAX_RETRY_AFTER_S)
    return every_s if exc.code == 3 else None


def show_events(api: ApiClient, output: str, limit: int = 50, since: int | None = None, kind: str | None = None,
                name: str | None = None) -> int:
    """The newest ``limit`` events, or with ``since`` the first ``limit`` after that one; oldest first."""
    data = api.request("GET", "/v1/events", params=_events_query(limit, since, kind, name))
    if output in ("json", "yaml"):
        render.dump(data, output)
        return 0
    render.table(None, EVENT_COLUMNS, [_event_row(e) for e in data["items"]])
    return 0
