"""Everything one reconcile pass looks at, frozen at one instant.

Gathering does the I/O (store reads, the agent hub's view, each data centre's Serve
status, artifact checks); planning is then a pure function of this value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from orchestrator import maintenance as maintenance_mod
from orchestrator.adapters import serve_config
from orchestrator.agents import model as agent_model
from orchestrator.gateway import routing
from orchestrator.manifests import schema
from orchestrator.reconciler import autoscaler
from orchestrator.reconciler import failback as failback_mod
from orchestrator.store import sqlite as store_mod


@dataclass(frozen=True)
class SiteRecord:
    name: str
    labels: Mapping[str, str]
    spec: schema.SiteSpec
    #: Which Site of its name was read: when it was stored (the store's clock), so that the
    #: pass's status for it lands on no other (:class:`~orchestrator.reconciler.actions.SetStatus`).
    created_at: float | None = None


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    generation: int
    spec: schema.ModelDeploymentSpec
    #: Which deployment of its name it is, and which of its captures is in force: when it was
    #: created, or its capture last turned on again, as stored (``store.capture_since``: its
    #: captured records are stamped with it); None for one not stored yet (a preview's).
    created: float | None = None
    #: Which deployment of its name was read, as :attr:`SiteRecord.created_at`.
    created_at: float | None = None


@dataclass(frozen=True)
class Desired:
    """The stored Sites, Models and ModelDeployments as validated values, and the stored
    objects this version no longer reads, (kind, name) -> why: while there is one, the fleet
    is on hold (:mod:`orchestrator.reconciler.hold`)."""

    sites: tuple[SiteRecord, ...]
    models: Mapping[str, schema.ModelSpec]
    deployments: tuple[DeploymentRecord, ...]
    unreadable: Mapping[tuple[str, str], str] = field(default_factory=dict)
    maintenance: Mapping[str, maintenance_mod.Maintenance] = field(default_factory=dict)  # by site: cordoned or draining
    model_generations: Mapping[str, int] = field(default_factory=dict)  # by Model: the generation of its spec read


#: A data centre's ``error`` while its first observation is still running.
FIRST_ANSWER_AWAITED = "waiting for its first answer (its first observation is still running)"


@dataclass(frozen=True)
class DataCentreObservation:
    reachable: bool
    apps: Mapping[str, serve_config.ServeAppStatus] = field(default_factory=dict)
    error: str = ""  # why it is out of reach; reachable, why the apply being retried failed
    drift: str = ""  # how its edgeplane applications differ from what this leader applied last
    # Unreachable as long as an agent may miss heartbeats before it is declared lost: what
    # it runs is written off as a lost agent's is (its replicas are placed elsewhere, a
    # drain of it is done), not known gone. Until then it keeps its replicas.
    lost: bool = False
    # Unreachable: what it ran when last observed, by this leader or the one it took over
    # from (None: not since either led, or since the site moved there), so that one seen
    # running none of ours (drained, then powered off) is not taken to serve again.
    last_apps: Mapping[str, serve_config.ServeAppStatus] | None = None
    # Unreachable: when this outage began (the store's time, seconds since the epoch: the
    # database server's clock, not the leader's own), as the leader that first found it out
    # of reach saw it: published with the rest, so that a leader taking over mid-outage,
    # whatever its own clock says, declares it lost when the old one would have.
    unreachable_at: float | None = None
    # Reachable: the apply being retried was refused (``error``), not failed for a while
    # (Ray starting, say): the deployments waiting on it are Failing, not starting.
    refused: bool = False
    # Not observed yet: its first observation is still running (a call that outlived its
    # pass's wait). Planned as out of reach (``reachable`` False, ``error`` saying so):
    # nothing new is placed there and nothing routed to it, until it answers or fails.
    waiting: bool = False
    # Its cluster's applications are marked as another control plane's, by this id (an
    # ``OwnedElsewhere`` refusal): it answers, so it is never declared lost (its replicas
    # moved off, and back once it is given back), and nothing can be applied there, so it
    # takes nothing new. It holds what it holds, as a cordoned site does, until an operator
    # takes it over (``takeOverFrom``) or the other gives it up.
    owned_by: str | None = None

    @classmethod
    def awaited(cls) -> DataCentreObservation:
        """A site whose first observation is still running."""
        return cls(False, error=FIRST_ANSWER_AWAITED, waiting=True)

    @property
    def routed(self) -> Mapping[str, serve_config.ServeAppStatus]:
        """The applications the gateway routes to: those it runs; out of reach but not lost,
        those it ran when last observed, as its Serve proxy (not the API that does not
        answer) most likely serves them on, and the gateway's failover and ejection handle a
        replica that does not; lost, none."""
        if self.reachable:
            return self.apps
        return {} if self.lost else self.last_apps or {}

    def routed_unseen(self, app: str) -> str:
        """Out of reach, what the gateway still routes to of application ``app``, as last
        observed ("" nothing). Not seen, those replicas are not counted ready; the placement
        and the deployment say that they are routed to, or either would read as if nothing
        answered where the gateway answers."""
        last = None if self.reachable else self.routed.get(app)
        if last is None or last.endpoint_url is None or last.replicas_running < 1:  # as the endpoint table takes them
            return ""
        until = "is given back" if self.owned_by is not None else "answers or is declared lost"  # another's: never lost
        return f"routed to as last observed ({last.status.value}, {last.replicas_running} running) until it {until}"


@dataclass(frozen=True)
class ArtifactRef:
    """Where consumers download a variant's artifact from, or why they cannot."""

    url: str | None
    error: str = ""
    hosts: tuple[str, ...] = ()  # where a download of it may be redirected (--artifact-host; empty: anywhere)


@dataclass(frozen=True)
class Snapshot:
    sites: tuple[SiteRecord, ...]
    models: Mapping[str, schema.ModelSpec]
    deployments: tuple[DeploymentRecord, ...]
    placements: tuple[store_mod.PlacementRow, ...]
    agents: tuple[agent_model.AgentStatus, ...]
    datacentres: Mapping[str, DataCentreObservation]
    artifacts: Mapping[tuple[str, str], ArtifactRef]  # (model, variant) -> where to fetch
    assignments: Mapping[str, tuple[agent_model.Assignment, ...]]  # what each agent was last sent
    applied_apps: Mapping[str, tuple[serve_config.ServeAppSpec, ...]]  # what each DC was last given
    autoscale: Mapping[str, autoscaler.Recommendation] = field(default_factory=dict)  # by deployment
    # Edge sites that held replicas when this control plane started and whose agents have
    # not rejoined yet (for at most the takeover time): planned as they were, sent nothing.
    rejoining: frozenset[str] = frozenset()
    # The endpoints a rejoining site had in the table this control plane started with (the
    # one its last run published), by site: the table keeps them until its agent is back.
    remembered: Mapping[str, tuple[routing.Endpoint, ...]] = field(default_factory=dict)
    # Stored objects this version does not read, with why (a preview's, what-if's): while
    # any is stored, nothing they plan takes effect (orchestrator.reconciler.hold).
    unreadable: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # Sites cordoned or being drained for maintenance, by name (orchestrator.maintenance):
    # operator state kept apart from the Sites' specs.
    maintenance: Mapping[str, maintenance_mod.Maintenance] = field(default_factory=dict)
    # sha256 -> where this control plane serves it, of each version agents were last sent
    # whose source it knows: one a halted rollout keeps may be named by no stored Model, and
    # the URL it was sent with may be a leader's that is gone.
    versions: Mapping[str, str] = field(default_factory=dict)
    # What the failback rule knows (the seats replicas left on sites lost since), with the
    # reconciler's clock as the pass gathered: a pure pass decides when they move back.
    failback: failback_mod.Failback = field(default_factory=failback_mod.Failback)
    # The generation of each Model as read, by name: a deployment's status names the one it
    # was computed against (``modelGeneration``), so a new version's rollout can be followed.
    model_generations: Mapping[str, int] = field(default_factory=dict)

    # Lookups by name, built once per snapshot: a pass touches every site and deployment,
    # and scanning the lists for each would make it quadratic in the fleet's size.

    @cached_property
    def site_by_name(self) -> Mapping[str, SiteRecord]:
        return {r.name: r for r in self.sites}

    @cached_property
    def agent_by_site(self) -> Mapping[str, agent_model.AgentStatus]:
        return {a.site: a for a in self.agents}

    @cached_property
    def urls_sent(self) -> Mapping[tuple[str, str], str]:
        """(model, sha256) -> the artifact URL agents were last sent for that version."""
        return {(a.model, a.sha256): a.artifact_url for sent in self.assignments.values() for a in sent if a.artifact_url}

    @cached_property
    def deployment_by_name(self) -> Mapping[str, DeploymentRecord]:
        return {d.name: d for d in self.deployments}
