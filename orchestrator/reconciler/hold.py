"""The fleet on hold: what a pass does while a stored object cannot be read.

An object an earlier version stored may break a rule made stricter since. Planning the
rest without it is not safe: its deployments' replicas hold capacity the scheduler would
hand to others, its Site's agent or cluster would be sent a set without them, and what it
routes to would outlive it. So while any stored object does not read, the leader plans
and acts on nothing (no placement, no push, no Serve apply or removal): what runs runs on
as it is, the gateway keeps the table it has, and the reason is given on the object, in
the log and in the control plane's view until the object is applied again (then checked
as a manifest) or deleted. Decided here purely; the loop acts on it.

Two things of the table follow the stored state all the same, as neither can wait for the
hold to end: an edge endpoint's health (an agent revoked or lost), and residency, a hard
rule: a stricter ``placement.residency`` applied meanwhile, or a Site declared in another
country, takes endpoints out of routing at once (:func:`narrowed`). Only ever narrowed: a
hold never widens the table or adds to it, as what it would widen to was never planned. A
model that loses every endpoint so stays known, with why (:func:`unrouted`): the reason the
table had for it (its deployment's last status, "Running") would not say why no caller
reaches it for as long as the hold lasts.

A deployment deleted meanwhile is not a change to plan but the operator's decision that
callers be sent there no more: its endpoints and cascade leave the table at once
(:func:`stored`), and a model no stored deployment serves then is not deployed, as
outside a hold. Its replicas run on until the hold ends, as a removal is planned like any
other change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from orchestrator import maintenance
from orchestrator.agents import model as agent_model
from orchestrator.gateway import cascade_rules, routing
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import inventory
from orchestrator.reconciler import snapshot as snap
from orchestrator.store import values as store_mod

Unreadable = Mapping[tuple[str, str], str]  # (kind, name) -> why this version does not read it
PUBLISHED_KEY = "hold"  # the leader's reason, published ("" when none): any replica's view reads it, not every object


def way_out(kind: str, name: str) -> str:
    """What ends the hold an unreadable object puts the fleet on. No manifest names a
    site's maintenance, nor does the API delete it as an object: uncordoning removes it."""
    if kind == maintenance.KIND:
        return f"`edgeplane uncordon site {name}` removes it"
    return "apply it again or delete it"


def until(kind: str, name: str) -> str:
    """:func:`way_out` as the end of "on hold until ..."."""
    if kind == maintenance.KIND:
        return way_out(kind, name)
    return "it is applied again (checked by this version) or deleted"


def reason(unreadable: Unreadable) -> str | None:
    """Why changes are on hold, in one line for operators, or None when nothing is held."""
    if not unreadable:
        return None
    held = sorted(unreadable.items())
    outs = dict.fromkeys(way_out(kind, name) for (kind, name), _ in held)
    if len(outs) == 1:
        return "changes on hold: " + "; ".join(f"{kind} {name!r} cannot be read ({why})" for (kind, name), why in held) + f": {next(iter(outs))}"
    return "changes on hold: " + "; ".join(f"{kind} {name!r} cannot be read ({why}): {way_out(kind, name)}" for (kind, name), why in held)


def object_status(kind: str, name: str, why: str) -> dict[str, Any]:
    return {"phase": "Unreadable", "reason": f"this version does not read it as stored ({why}); every change to the fleet is "
            f"on hold (what runs keeps running) until {until(kind, name)}"}


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


def narrowed(in_force: Iterable[routing.Endpoint], sites: Iterable[snap.SiteRecord],
             deployments: Iterable[snap.DeploymentRecord]) -> tuple[routing.Endpoint, ...]:
    """The table's endpoints under the residency the stored ``sites`` and ``deployments``
    (those that read) give them now, never wider than the table's: each endpoint's allowed
    countries are those both allow (an endpoint whose country the deployment now forbids
    is kept, for routing to say why, but no caller reaches it), and an endpoint whose Site
    is now declared in another country is dropped (whether a caller's residency allows it
    holds under neither country alone). A deployment or Site that does not read, or is
    gone, leaves its endpoints as they are."""
    country = {s.name: s.spec.location.country for s in sites}
    residency = {d.name: inventory.allowed_countries(d.spec) for d in deployments}
    out = []
    for e in in_force:
        if country.get(e.site, e.country) != e.country:
            continue
        now = residency.get(e.deployment, frozenset())  # empty: any country, or not known: nothing to narrow
        if not now or (e.allowed_countries and e.country not in e.allowed_countries):  # the latter: unreachable already
            out.append(e)
            continue
        # an empty intersection would read "any": then ``now`` alone, which the endpoint's country is outside of
        both = (e.allowed_countries & now if e.allowed_countries else now) or now
        out.append(dataclasses.replace(e, allowed_countries=both) if both != e.allowed_countries else e)
    return tuple(out)


def stored(desired: snap.Desired) -> frozenset[str]:
    """The ModelDeployments stored now, read or not: a deployment not among them was deleted."""
    return frozenset(d.name for d in desired.deployments) | frozenset(name for kind, name in desired.unreadable if kind == "ModelDeployment")


def undeployed(in_force: Iterable[routing.Endpoint], left: Iterable[routing.Endpoint], deployed: Iterable[str],
               desired: snap.Desired) -> frozenset[str]:
    """The models the table knows (with endpoints, or ``deployed`` without) that no stored
    deployment serves any more, once the deleted ones' endpoints are dropped (``left``). A
    deployment that does not read may serve any model: while one is stored, only the models
    whose endpoints were dropped are known to be gone."""
    served = {d.spec.model for d in desired.deployments} | {e.model for e in left}
    if any(kind == "ModelDeployment" for kind, _ in desired.unreadable):
        kept = frozenset(e.deployment for e in left)
        return frozenset(e.model for e in in_force if e.deployment not in kept) - served
    return frozenset({e.model for e in in_force} | set(deployed)) - served


def unrouted(in_force: Iterable[routing.Endpoint], narrow: Iterable[routing.Endpoint], unreadable: Unreadable) -> dict[str, str]:
    """Why each model that had endpoints in force and has none left after :func:`narrowed`
    has none: its replicas' Sites are declared in another country (the one endpoint a
    narrowing drops), until the hold ends."""
    left = {e.model for e in narrow}
    sites: dict[str, set[str]] = {}
    for e in in_force:
        if e.model not in left:
            sites.setdefault(e.model, set()).add(e.site)
    return {model: f"its replicas' Sites ({routing.listed_sites(names)}) are declared in another country than they were placed "
                   f"in, and are not routed to until the hold ends ({reason(unreadable)})" for model, names in sorted(sites.items())}


def actions(desired: snap.Desired, in_force: Iterable[routing.Endpoint],
            agents: Iterable[agent_model.AgentStatus], awaited: Iterable[str] = (),
            cascades: Mapping[str, cascade_rules.CascadeRoute] | None = None, deployed: Iterable[str] = ()) -> tuple[act.Action, ...]:
    """A pass on hold: each unreadable object's status, and the table's endpoints less those
    of deployments deleted since (:func:`stored`; their ``cascades`` too, and the models so
    left ``deployed`` by none: :func:`undeployed`), with their residency narrowed to the
    stored specs that read (:func:`narrowed`), why a model so left with none has none
    (:func:`unrouted`), and the edge ones' health as their agents' (``awaited``: edge sites
    whose agents are not back since a restart, see :func:`refreshed`)."""
    out: list[act.Action] = [act.SetStatuses(tuple(act.SetStatus(kind, name, object_status(kind, name, why))
                                                   for (kind, name), why in sorted(desired.unreadable.items())))]
    table, names = tuple(in_force), stored(desired)
    live = tuple(e for e in table if e.deployment in names)
    gone = undeployed(table, live, deployed, desired)
    narrow = narrowed(live, desired.sites, desired.deployments)
    endpoints = refreshed(narrow, agents, awaited) or narrow
    if endpoints != table or gone:
        out.append(act.RefreshHealth(endpoints, unrouted(live, narrow, desired.unreadable), gone))
    routes = dict(cascades or {})
    if (kept := cascades_left(routes, names)) != routes:
        out.append(act.PublishCascades(kept))
    return tuple(out)


def cascades_left(cascades: Mapping[str, cascade_rules.CascadeRoute], names: Collection[str]) -> dict[str, cascade_rules.CascadeRoute]:
    """The table's ``cascades`` less those of deployments deleted (not among the stored
    ``names``). A model's name that led to a deleted cascade leads to the one of the model's
    left that the planner would publish under it (:func:`cascade_rules.routes_by_name`, over
    the deployments in the order the store lists them: by name), or is dropped with the last."""
    left = {r.deployment: r for r in cascades.values() if r.deployment in names}
    again = cascade_rules.routes_by_name(left[name] for name in sorted(left))
    return {name: r if r.deployment in names else again[name] for name, r in cascades.items()
            if r.deployment in names or (name == r.model and name in again)}
