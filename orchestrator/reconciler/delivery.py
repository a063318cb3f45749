"""Which edge agents a pass sends their site's assignment set, decided purely.

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
"""

from __future__ import annotations

from collections.abc import Mapping

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
