"""Which edge agents a pass sends their site's assignment set, and which it forgets, decided purely.

An agent unloads at once a model its set leaves out, and the hub hands a site's last set to
its agent as it joins. A set that takes a model from an agent that may still serve it would
have it answer 404, then 503 while it downloads and loads the model again, whenever the
pass after gives the model back. So a set goes only to a site whose agent is here: not one
still rejoining after a restart, nor one not back in time (what it gets on its return is the
plan then). And an agent the hub calls lost is sent none unless its Site was deleted or is
drained: the plan places nothing new on a lost site, so whatever else it would be sent could
only take from it, while it may be lost only by heartbeats that came late (a starved
machine, a stalled link). Its replicas move and the gateway stops routing to it all the same;
once its heartbeats are back, it is sent the plan made then, smaller only if that still
leaves its models out. A deleted Site's agent must serve nothing, and a drain is the
operator's word that the site is to serve less.

A deleted Site's agent, once lost, is forgotten (nothing else would drop its record), but
only after it was sent the empty set: forgetting it ends its watch stream, and with it the
set on its way, so a lost agent that still serves (late heartbeats again) would serve on.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from orchestrator.agents import model as agent_model
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import snapshot as snap


def pushes(s: snap.Snapshot, assigned: Mapping[str, tuple[agent_model.Assignment, ...]]) -> list[act.PushAssignments]:
    """The sets of ``assigned`` (what each edge site should serve, ``planning.edge_assignments``)
    to send: each that differs from the one its site was last sent, where its agent may take it."""
    out = []
    for site, assignments in assigned.items():
        agent = s.agent_by_site.get(site)
        if agent is None or assignments == s.assignments.get(site):
            continue
        if not agent.healthy and site in s.site_by_name and not (site in s.maintenance and s.maintenance[site].draining):
            continue
        out.append(act.PushAssignments(site, assignments))
    return out


def agents_to_forget(agents: Iterable[agent_model.AgentStatus], stored_sites: Collection[str],
                     sent: Mapping[str, tuple[agent_model.Assignment, ...]], pushed: Iterable[act.PushAssignments] = ()) -> list[str]:
    """The sites of the lost agents among ``agents`` whose Site is not in ``stored_sites``
    and which were last sent (``sent``, by site) an empty set, or none, and are not sent one
    now (``pushed``, a pass's): a deleted Site's agent stays while connected, and is forgotten
    once lost and told to serve nothing (a pass sends it the empty set, the pass after
    forgets it; so too one sent none since this control plane started, which serves what it
    cached). A follower, which sends nothing, forgets one the leader never sent a set."""
    now = {p.site for p in pushed}
    return [a.site for a in agents if not a.healthy and a.site not in stored_sites and not sent.get(a.site) and a.site not in now]
