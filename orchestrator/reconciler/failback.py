"""Failback: replicas moved off a lost site go back once it has stayed healthy a while.

A site's loss moves its replicas to stand-ins elsewhere (the plan in force repaired, or a
full plan). Nothing moved them back by itself: a repair moves only what is lost, and a
full plan charges a move (and the keep margin) for going back while the stand-ins' seats
cost none, so after an edge site's outage of a minute the fleet stayed on its stand-ins
for good, where a plan from nothing puts the replicas back on the site, nearer their demand.

So a pass remembers, per site, the seats its replicas left while it was lost (deployment,
site, variant: ``Failback.seats``). Once the site is healthy again and has stayed so for
the hold-down (``edgeplane serve --failback-after``), one pass plans the fleet in full with
those seats counted as ones their deployments run (``planner.plan``'s ``returning``): going
back costs no move and staying costs none, and the planner's latency, carbon and fit decide
between each seat and its stand-in, as in a plan from nothing. The seats are then
forgotten, whatever that plan did. A site lost again within the hold-down starts it over,
and nothing moves meanwhile: a flapping site draws no traffic back to it. A pass sees a
loss the passes on either side of it missed (an agent lost and back between two passes)
by its agent's ``healthy_since``, which a join or heartbeats resumed after a loss move and
a live agent's new session keeps: the value the last pass saw differs (``flapped``). The
last pass's values are this leader's only: a new leader's first pass takes what it finds.
An agent that restarted flapped too, even where no pass saw it gone (it rejoined while
still counted live, or while no leader held it): the start time it says at each join
differs from the one a pass last saw, which the store keeps with the site's seats, so a
new leader compares it too. An agent of an earlier version says none, and is judged by its
``healthy_since`` alone.
The moves are those of any plan, made before they break (``maintenance.keep_until_replaced``).

The seats are a placement the site held, not the sum of all it ever held. The moves of one
loss add up, over as many passes as it takes; a new loss of a site that was back (replicas
placed on it meanwhile, by a plan or a scale-up, and moved off again) remembers, per
deployment and variant, the larger of its own count and the one remembered. Adding them
would count a stand-in a plan had put back on the site, and moved off again, once per
loss: the memory of a site flapping with replicas on it would grow without bound, and its
failback would credit it with seats it never held at once.

Decided purely: the memory is a value the pass finds in its snapshot, with the
reconciler's clock read once as it gathered (``now``), and hands back with its plan. The
reconciler keeps it in the store (``failback_record``), written before the pass's moves
are made: a restarted control plane or a new leader reads it back and goes on with each
hold-down where the last leader left it. A site back then serves nothing, so no pass waits
for its agent to join the new leader: until it does, within the time the leader gives its
agents to (``rejoin_until``), the site is neither back nor lost, and keeps its return.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.agents import model as agent_model
from orchestrator.scheduler import model as sched_model
from orchestrator.scheduler import result as sched_result
from orchestrator.store import sqlite as store_mod

ACTOR = "scheduler"


@dataclass(frozen=True)
class Failback:
    """What the failback rule knows as a pass begins."""

    after_s: float = 0.0  # the hold-down; 0: replicas moved off a lost site never move back
    now: float = 0.0  # the reconciler's clock when the pass gathered
    # Per site lost since, the seats its replicas left for stand-ins elsewhere.
    seats: Mapping[str, tuple[sched_model.Replica, ...]] = field(default_factory=dict)
    # Of those sites, the ones healthy again: since when (``now`` of the pass that first found them so).
    back_since: Mapping[str, float] = field(default_factory=dict)
    # Of those sites, the ones lost now: the seats this loss left so far (``seats`` holds, per
    # deployment and variant, the larger of these and those of the site's earlier losses).
    losing: Mapping[str, tuple[sched_model.Replica, ...]] = field(default_factory=dict)
    # Per edge site with a healthy agent now, since when it has been healthy without a break
    # (``AgentStatus.healthy_since``, set by ``observing``); and per remembered site, that
    # value as this leader's last pass found it (kept by this term only: not in the store).
    healthy_since: Mapping[str, float] = field(default_factory=dict)
    sessions: Mapping[str, float] = field(default_factory=dict)
    # Per edge site with a healthy agent now that says when its process started
    # (``AgentStatus.started_unix_ms``, set by ``observing``); and per remembered site, that
    # value as the last pass, this leader's or the last one's, found it (kept in the store).
    agent_started: Mapping[str, int] = field(default_factory=dict)
    started_seen: Mapping[str, int] = field(default_factory=dict)
    # The edge sites with an agent now, healthy or not (set by ``observing``); and until when
    # (the reconciler's clock) this leader gives its agents to join it after it took over or
    # restarted: a remembered edge site back when the last leader left, whose agent has not
    # joined this one yet, is neither back nor lost meanwhile, and keeps its return.
    joined: frozenset[str] = frozenset()
    rejoin_until: float = 0.0

    def observing(self, agents: Iterable[agent_model.AgentStatus]) -> Failback:
        """This memory with the pass's agents observed (``healthy_since``, ``joined``)."""
        agents = tuple(agents)
        return dataclasses.replace(self, healthy_since={a.site: a.healthy_since for a in agents if a.healthy},
                                   agent_started={a.site: a.started_unix_ms for a in agents if a.healthy and a.started_unix_ms},
                                   joined=frozenset(a.site for a in agents))

    def flapped(self) -> frozenset[str]:
        """The remembered sites lost and back since the last pass, which found them healthy
        too: their agents' ``healthy_since`` moved (a join, or heartbeats resumed after a loss),
        or their agents restarted (the start time they said differs from the one last seen)."""
        moved = {name for name, since in self.healthy_since.items() if name in self.sessions and self.sessions[name] != since}
        restarted = {name for name, at in self.agent_started.items() if self.started_seen.get(name, at) != at}
        return frozenset(moved | restarted)

    def due(self, sites: Sequence[sched_model.Site]) -> frozenset[str]:
        """The sites whose replicas may move back in this pass: healthy again, for the
        hold-down, and taking replicas. One cordoned, drained or out of reach (``admits``,
        ``draining``) would take none back: its seats wait until it takes them again."""
        if self.after_s <= 0:
            return frozenset()
        taking = {site.name for site in sites if site.open and site.admits is None} - self.flapped()
        return frozenset(name for name, since in self.back_since.items()
                         if name in taking and name in self.seats and self.now - since >= self.after_s)

    def returning(self, due: Iterable[str]) -> list[sched_model.Replica]:
        """The seats the stand-ins of the ``due`` sites stood in for (``planner.plan``'s ``returning``)."""
        return [seat for name in sorted(due) for seat in self.seats.get(name, ())]

    def after(self, sites: Sequence[sched_model.Site], result: sched_result.PlanResult, due: Iterable[str]) -> Failback:
        """The memory for the next pass: the ``due`` sites' seats forgotten (their failback
        was planned), the seats the plan's moves leave on sites lost now added to their
        loss's (per deployment and variant, the larger of the loss's and the remembered
        count is remembered), and each remembered site's return noted, or its loss, which
        starts its hold-down over, as a return after a loss no pass saw does (``flapped``);
        an edge site whose agent this leader still gives the time to join it keeps its return
        (``rejoin_until``). A site no longer in the inventory is forgotten."""
        if self.after_s <= 0:
            return dataclasses.replace(self, healthy_since={}, agent_started={}, joined=frozenset())
        by_name = {site.name: site for site in sites}
        done = frozenset(due)
        seats = {name: Counter(kept) for name, kept in self.seats.items() if name in by_name and name not in done}
        losing = {name: Counter(kept) for name, kept in self.losing.items() if name in seats and not by_name[name].healthy}
        for a in result.actions:
            source = by_name.get(a.from_site) if isinstance(a, sched_result.MoveReplica) else None
            if source is not None and not source.healthy:
                losing.setdefault(a.from_site, Counter())[sched_model.Replica(a.deployment, a.from_site, a.from_variant)] += 1
        for name, left in losing.items():
            seats[name] = seats.get(name, Counter()) | left  # per seat, the larger count
        flapped = self.flapped()
        back = {name: self.now if name in flapped else self.back_since.get(name, self.now) for name in seats if by_name[name].healthy}
        back.update((name, since) for name, since in self.back_since.items() if name in seats and self._awaited(by_name[name]))
        sessions = {name: since for name, since in {**self.sessions, **self.healthy_since}.items() if name in seats}
        started = {name: at for name, at in {**self.started_seen, **self.agent_started}.items() if name in seats}
        return Failback(self.after_s, self.now, _tuples(seats), back, _tuples(losing), sessions=sessions, started_seen=started,
                        rejoin_until=self.rejoin_until)

    def _awaited(self, site: sched_model.Site) -> bool:
        """Whether ``site``, unhealthy in this pass, is an edge site whose agent has not joined
        this leader yet while it gives its agents the time to (``rejoin_until``)."""
        return (not site.healthy and site.tier is sched_model.Tier.EDGE and self.now < self.rejoin_until
                and site.name not in self.joined and site.name not in self.sessions)

    def events(self, due: Iterable[str], result: sched_result.PlanResult) -> tuple[store_mod.Event, ...]:
        """One ``failback`` event per ``due`` site the plan moves replicas back to."""
        out = []
        for site in sorted(due):
            moved = [a for a in result.actions if isinstance(a, sched_result.MoveReplica) and a.to_site == site]
            if moved:
                names = sorted({a.deployment for a in moved})
                out.append(store_mod.Event(
                    ACTOR, "failback", "Site", site,
                    f"healthy again for {self.now - self.back_since[site]:.0f} s (--failback-after {self.after_s:g}): "
                    f"{len(moved)} replica(s) of {', '.join(names)} move back from the sites that stood in for it, "
                    "each stand-in leaving once its replacement serves",
                    {"replicas": len(moved), "deployments": names}))
        return tuple(out)


def moved_back(events: Iterable[store_mod.Event]) -> int:
    """The replicas the ``failback`` events among ``events`` move back (``edgeplane_failback_replicas_total``)."""
    return sum(int(e.details.get("replicas", 0)) for e in events if e.action == "failback")


def _tuples(seats: Mapping[str, Counter[sched_model.Replica]]) -> dict[str, tuple[sched_model.Replica, ...]]:
    """Per site, each seat as many times as counted, in a steady order."""
    return {name: tuple(sorted(kept.elements(), key=lambda r: (r.deployment, r.variant))) for name, kept in seats.items()}
