"""The control plane's fleet gauges and counters for ``/metrics``, read from live state at scrape time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from orchestrator import server
    from orchestrator.store import sqlite as store_mod


class FleetCollector:
    """Fleet gauges and counters computed at scrape time from live state (no bookkeeping on hot paths)."""

    def __init__(self, cp: server.ControlPlane):
        self.cp = cp
        #: The stored placement, read off the event loop before each scrape
        #: (``ControlPlane.metrics``): the store may wait on a stalled database.
        #: None while the store cannot be read: the family is left out rather than
        #: reported from an older read that nothing marks as stale.
        self.placements: Sequence[store_mod.PlacementRow] | None = ()
        #: Sites cordoned and draining, by state, read with the placement (None: not read).
        self.maintenance: dict[str, int] | None = {}
        #: Per site with a power budget, its ``status.power`` (budgetWatts, estimatedWatts), read with the placement.
        self.power: dict[str, dict[str, float]] | None = {}
        #: Per deployment rolling out a version, its status's ``rollout`` block, read with the placement.
        self.rollouts: dict[str, dict[str, Any]] | None = {}

    def collect(self) -> Any:
        # Each replica counts the agents connected to it and their heartbeats, summed across
        # replicas: the leader's relayed records (``via``) are a follower's agents, counted there.
        agents = [a for a in self.cp.hub.snapshot() if a.via is None] if hasattr(self.cp, "hub") else []
        g = GaugeMetricFamily("edgeplane_agents", "Joined edge agents by health", labels=["health"])
        g.add_metric(["healthy"], sum(1 for a in agents if a.healthy))
        g.add_metric(["unhealthy"], sum(1 for a in agents if not a.healthy))
        yield g
        beats = getattr(getattr(self.cp, "hub", None), "heartbeats_total", 0)
        passes = getattr(getattr(self.cp, "reconciler", None), "passes", 0)
        # Both only grow, so they are counters (``..._total``: rate() and increase() read a
        # restart as a reset). The gauges of the same numbers stay for the dashboards that
        # read them, deprecated (docs/deploy.md).
        hb = CounterMetricFamily("edgeplane_heartbeats_received", "Agent heartbeats received since start")
        hb.add_metric([], beats)
        yield hb
        joins = getattr(self.cp, "joins", None)
        refused = CounterMetricFamily("edgeplane_agent_joins_refused", "Agent joins refused since start because as many "
                                      "as --max-joins were being worked on (each told when to join again)")
        refused.add_metric([], joins.refused_total if joins is not None else 0)
        yield refused
        failures = getattr(self.cp, "failed_joins", None)
        for_failures = CounterMetricFamily("edgeplane_agent_joins_refused_for_failures", "Agent joins refused since start, before "
                                           "being worked on, because their address (or certificate's site) failed more joins than "
                                           "--join-failure-rate and --join-failure-burst allow")
        for_failures.add_metric([], failures.refused_total if failures is not None else 0)
        yield for_failures
        working = GaugeMetricFamily("edgeplane_agent_joins_in_progress", "Agent joins being worked on now (at most --max-joins)")
        working.add_metric([], joins.in_progress if joins is not None else 0)
        yield working
        r = CounterMetricFamily("edgeplane_reconcile_passes", "Reconcile passes completed since start")
        r.add_metric([], passes)
        yield r
        old_hb = GaugeMetricFamily("edgeplane_heartbeats_received", "Deprecated: edgeplane_heartbeats_received_total")
        old_hb.add_metric([], beats)
        yield old_hb
        old_r = GaugeMetricFamily("edgeplane_reconcile_passes", "Deprecated: edgeplane_reconcile_passes_total")
        old_r.add_metric([], passes)
        yield old_r
        back = CounterMetricFamily("edgeplane_failback_replicas", "Replicas moved back to a lost site once it had stayed "
                                   "healthy for --failback-after (the leader's, since it started)")
        back.add_metric([], getattr(getattr(self.cp, "reconciler", None), "failed_back", 0))
        yield back
        unreadable = GaugeMetricFamily("edgeplane_unreadable_objects", "Stored objects the leader's last pass could not read: "
                                       "while any, every change to the fleet is on hold")
        unreadable.add_metric([], len(getattr(getattr(self.cp, "reconciler", None), "unreadable", {})))
        yield unreadable
        again = CounterMetricFamily("edgeplane_datacentre_reapplied",
                                    "Times a data centre's Serve applications, changed by another writer, were applied again",
                                    labels=["site"])
        for site, n in sorted(getattr(getattr(getattr(self.cp, "reconciler", None), "dc_sync", None), "reapplied", {}).items()):
            again.add_metric([site], n)
        yield again
        owned = GaugeMetricFamily("edgeplane_datacentre_owned_elsewhere",
                                  "1 while a data centre's applications are marked as another control plane's (its Site "
                                  "OwnedElsewhere): nothing there is changed until the Site's spec.takeOverFrom takes it over (the leader's: a follower has none)",
                                  labels=["site"])
        dc_sync = getattr(getattr(self.cp, "reconciler", None), "dc_sync", None)
        leads = self.cp.elector is None or self.cp.elector.leading  # a replica that stepped down keeps its last term's
        for site, elsewhere in sorted(dc_sync.owned_elsewhere().items() if dc_sync is not None and leads else ()):
            owned.add_metric([site], 1 if elsewhere else 0)
        yield owned
        elector = self.cp.elector
        lead = GaugeMetricFamily("edgeplane_leader", "1 while this replica leads (runs the reconciler), else 0")
        lead.add_metric([], 1 if elector is None or elector.leading else 0)
        yield lead
        changes = CounterMetricFamily("edgeplane_leader_changes", "Times this replica gained or lost the leader lease")
        changes.add_metric([], elector.changes if elector is not None else 0)
        yield changes
        if hasattr(self.cp, "store"):
            if self.placements is not None:
                p = GaugeMetricFamily("edgeplane_replicas_placed", "Replicas placed, by deployment", labels=["deployment"])
                per: dict[str, int] = {}
                for row in self.placements:
                    per[row.deployment] = per.get(row.deployment, 0) + row.replicas
                for d, n in sorted(per.items()):
                    p.add_metric([d], n)
                yield p
            if self.maintenance is not None:
                m = GaugeMetricFamily("edgeplane_sites_cordoned", "Sites taken out of scheduling for maintenance, by state "
                                      "(cordoned: keeps its replicas; draining: they move elsewhere)", labels=["state"])
                for state in ("cordoned", "draining"):
                    m.add_metric([state], self.maintenance.get(state, 0))
                yield m
            if self.power is not None:
                w = GaugeMetricFamily("edgeplane_site_power_watts", "Power of the sites with a budget, in facility watts: the "
                                      "estimated draw of the replicas placed there (× PUE) and the budget", labels=["site", "kind"])
                for site, power in sorted(self.power.items()):
                    w.add_metric([site, "estimated"], power.get("estimatedWatts", 0.0))
                    w.add_metric([site, "budget"], power.get("budgetWatts", 0.0))
                yield w
            if self.rollouts is not None:
                # one series per deployment rolling out now (a finished rollout's goes): bounded by the deployments
                halted = GaugeMetricFamily("edgeplane_rollout_halted", "1 while a deployment's rollout is halted (a site could "
                                           "not load the new version; no further site is sent it), 0 while it goes on",
                                           labels=["deployment"])
                replacing = GaugeMetricFamily("edgeplane_rollout_replacing_sites", "Sites of a deployment rolling out that "
                                              "serve no version of its model meanwhile (rollout.strategy: replaceWhenFull "
                                              "unloaded the old one first)", labels=["deployment"])
                for d, block in sorted(self.rollouts.items()):
                    halted.add_metric([d], 1 if block.get("halted") else 0)
                    replacing.add_metric([d], len(block.get("replacing") or ()))
                yield halted
                yield replacing
            e = GaugeMetricFamily("edgeplane_endpoints", "Routable endpoints, by model", labels=["model"])
            for m in self.cp.table.models():
                # a lost agent's replicas stay listed, unhealthy, and no request goes to them:
                # counted, a model every request of which gets a 503 would read as served
                e.add_metric([m], sum(1 for ep in self.cp.table.endpoints(m) if ep.healthy))
            yield e
