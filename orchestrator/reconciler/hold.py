"""The fleet on hold: what a pass does while a stored object cannot be read.

An object an earlier version stored may break a rule made stricter since. Planning the
rest without it is not safe: its deployments' replicas hold capacity the scheduler would
hand to others, its Site's agent or cluster would be sent a set without them, and what it
routes to would outlive it. So while any stored object does not read, the leader plans
and acts on nothing (no placement, no push, no Serve apply or removal): what runs runs on
as it is, the gateway keeps the table it has, and the reason is given on the object, in
the log and in the control plane's view until the object is applied again (then checked
as a manifest) or deleted. Decided here purely; the loop acts on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from orchestrator.agents import model as agent_model
from orchestrator.gateway import routing
from orchestrator.reconciler import actions as act
from orchestrator.store import values as store_mod

Unreadable = Mapping[tuple[str, str], str]  # (kind, name) -> why this version does not read it
PUBLISHED_KEY = "hold"  # the leader's reason, published ("" when none): any replica's view reads it, not every object


def reason(unreadable: Unreadable) -> str | None:
    """Why changes are on hold, in one line for operators, or None when nothing is held."""
    if not unreadable:
        return None
    each = [f"{kind} {name!r} cannot be read ({why})" for (kind, name), why in sorted(unreadable.items())]
    return "changes on hold: " + "; ".join(each) + ": apply it again or delete it"


def object_status(why: str) -> dict[str, Any]:
    return {"phase": "Unreadable", "reason": f"this version does not read it as stored ({why}); every change to the fleet is "
            "on hold (what runs keeps running) until it is applied again (checked by this version) or deleted"}


def unreadable_sites(unreadable: Unreadable) -> frozenset[str]:
    return frozenset(name for kind, name in unreadable if kind == "Site")


def awaited_unread(unreadable: Unreadable, placements: Iterable[store_mod.PlacementRow],
                   agents: Iterable[agent_model.AgentStatus]) -> frozenset[str]:
    """The sites that do not read whose replicas are placed and whose agents are not back:
    whether they are edge sites to await cannot be told from them, so they are awaited."""
    unread, back = unreadable_sites(unreadable), {a.site for a in agents}
    return frozenset(r.site for r in placements if r.site in unread and r.site not in back)


def refreshed(in_force: Iterable[routing.Endpoint], agents: Iterable[agent_model.AgentStatus],
              awaited: Iterable[str] = ()) -> tuple[routing.Endpoint, ...] | None:
    """The table's endpoints with each edge one's health as its agent's now, or None when
    none changed. An edge site whose agent is not connected is unhealthy (its agent was
    revoked, forgotten or lost), unless it is still ``awaited``: just after a restart its
    agent has not come back yet, and its endpoints stay as they are. A data centre, not
    observed while on hold, keeps its own."""
    health = {a.site: a.healthy for a in agents}
    keep = frozenset(awaited)

    def now(e: routing.Endpoint) -> bool:
        return health.get(e.site, e.healthy if e.site in keep else False)

    table = tuple(in_force)
    out = tuple(dataclasses.replace(e, healthy=now(e)) if e.tier == "edge" and now(e) != e.healthy else e for e in table)
    return out if out != table else None


def actions(unreadable: Unreadable, in_force: Iterable[routing.Endpoint],
            agents: Iterable[agent_model.AgentStatus], awaited: Iterable[str] = ()) -> tuple[act.Action, ...]:
    """A pass on hold: each unreadable object's status, and the edge endpoints' health
    (``awaited``: edge sites whose agents are not back since a restart, see :func:`refreshed`)."""
    out: list[act.Action] = [act.SetStatuses(tuple(act.SetStatus(kind, name, object_status(why))
                                                   for (kind, name), why in sorted(unreadable.items())))]
    if (endpoints := refreshed(in_force, agents, awaited)) is not None:
        out.append(act.RefreshHealth(endpoints))
    return tuple(out)
