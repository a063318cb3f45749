"""What the leader's last pass observed, published in the store for the other replicas.

Every replica serves the API, but only the leader's pass observes the fleet: its hub holds
every agent (those relayed by followers too), its pass each data centre's applications,
each artifact checked, the autoscaler's counts and the plan in force. A follower's own hub
holds only the agents connected to it, so a preview planned there (``apply --dry-run``,
``drain --dry-run``, ``simulate``) would take every other site for agent-less, and
``get placements`` or ``describe`` would show no replica state. The leader therefore
publishes the observed half of its pass's snapshot, with what ``describe`` shows of its
plan, as it publishes the endpoint table (``PUBLISHED_KEY``), and only when it changed;
a follower answers those reads from it.

Agents' load (heartbeat times, in-flight counts, CPU, free memory) is left out: no
preview or view reads it, and it would change the document at every pass. A download's
progress (a loading model's message) is kept, but a change of it alone is written at most
every ``load_publish_s`` (:func:`to_texts` tells it). What is kept
of heartbeat times is whether the agent reported since it joined.

The document also says where each version in use came from (``sources``: sha256 -> the
URI a Model named): a version a halted rollout keeps on some sites is named by no stored
Model any more, and a new leader could neither check nor serve it without its source. For
the same reason a new leader (or a control plane that restarted) takes each data centre's
last observation from it: one out of reach is routed as it was last observed, and declared
lost when the old leader would have (``unreachableAt``), not from the new one's first try.

Replicas of two releases read one another's documents during a rolling update and after a
rollback, so a reader takes what it knows and ignores the rest: a field it does not know
(at any level), an item past those it reads at the end of a row. A field it needs that is
missing or malformed still makes the document one it cannot read (:func:`from_text`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestrator.adapters import serve_config
from orchestrator.agents import model as agent_model
from orchestrator.reconciler import autoscaler
from orchestrator.reconciler import snapshot as snap

PUBLISHED_KEY = "observed"

T = TypeVar("T")


@dataclass(frozen=True)
class Observed:
    """The observed half of a pass's snapshot, and what ``describe`` shows of its plan."""

    agents: tuple[agent_model.AgentStatus, ...] = ()
    datacentres: Mapping[str, snap.DataCentreObservation] = field(default_factory=dict)
    artifacts: Mapping[tuple[str, str], snap.ArtifactRef] = field(default_factory=dict)
    autoscale: Mapping[str, autoscaler.Recommendation] = field(default_factory=dict)
    rejoining: frozenset[str] = frozenset()
    described: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # describe's extra, by deployment
    sources: Mapping[str, str] = field(default_factory=dict)  # sha256 -> URI, of each version in use
    at: float | None = None  # when the leader wrote it (the store's time): a follower's answers from it say so (observedAt)

    def over(self, desired: snap.Desired, placements: tuple[Any, ...]) -> snap.Snapshot:
        """A snapshot of ``desired`` as stored now with what the leader observed."""
        return snap.Snapshot(
            desired.sites, desired.models, desired.deployments, placements, self.agents,
            datacentres=self.datacentres, artifacts=self.artifacts, assignments={}, applied_apps={},
            autoscale=self.autoscale, rejoining=self.rejoining, unreadable=desired.unreadable, maintenance=desired.maintenance,
            model_generations=desired.model_generations)


def to_text(o: Observed) -> str:
    return json.dumps(_document(o), sort_keys=True, separators=(",", ":"))


def to_texts(o: Observed) -> tuple[str, str]:
    """The published document (:func:`to_text`), and the same but for the messages of the
    models agents are loading: its decisive part, which a download's progress leaves as it is."""
    doc = _document(o)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    for agent in doc["agents"]:
        for m in agent["models"]:  # [name, sha256, phase, message, ...] (_agent_doc)
            if m[2] == agent_model.ModelPhase.LOADING.value:
                m[3] = ""
    return text, json.dumps(doc, sort_keys=True, separators=(",", ":"))


def from_text(text: str) -> Observed:
    """The published document; ValueError (KeyError, TypeError included) when this version cannot read it."""
    try:
        doc = json.loads(text)
        return Observed(
            agents=tuple(_agent(a) for a in doc["agents"]),
            datacentres={site: _datacentre(d) for site, d in doc["datacentres"].items()},
            artifacts={(a["model"], a["variant"]): snap.ArtifactRef(a["url"], a["error"], tuple(a["hosts"])) for a in doc["artifacts"]},
            autoscale={name: _known(autoscaler.Recommendation, r) for name, r in doc["autoscale"].items()},
            rejoining=frozenset(doc["rejoining"]),
            described=doc["described"],
            sources=dict(doc.get("sources", {})),  # "sources" and "observedAt" are absent from an earlier leader's
            at=doc.get("observedAt"),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"the observed fleet the leader published is not one this version reads: {exc!r}") from exc


def _known(cls: type[T], record: Mapping[str, Any], **read: Any) -> T:
    """``cls`` (a dataclass) from the fields of ``record`` it has, ``read`` in place of those
    decoded apart; a field a later release added is ignored, one ``cls`` needs and lacks is a TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in record.items() if k in names}, **read})


def _row(items: Sequence[Any], n: int) -> Sequence[Any]:
    """The ``n`` items a row holds in this version; those a later release appended are ignored."""
    if not isinstance(items, list) or len(items) < n:
        raise ValueError(f"a row of {n} items, not {items!r}")
    return items[:n]


def _document(o: Observed) -> dict[str, Any]:
    return {
        "agents": [_agent_doc(a) for a in sorted(o.agents, key=lambda a: a.site)],
        "datacentres": {site: _datacentre_doc(d) for site, d in o.datacentres.items()},
        "artifacts": [{"model": m, "variant": v, "url": r.url, "error": r.error, "hosts": list(r.hosts)}
                      for (m, v), r in sorted(o.artifacts.items())],
        "autoscale": {name: vars(r) for name, r in o.autoscale.items()},
        "rejoining": sorted(o.rejoining),
        "energy": None,  # read by followers of earlier versions, which require it (a preview now measures the rows)
        "described": o.described,
        "sources": dict(o.sources),
        "observedAt": o.at,
    }


def _agent_doc(a: agent_model.AgentStatus) -> dict[str, Any]:
    c, loc = a.capacity, a.location
    return {
        "site": a.site, "agentId": a.agent_id, "endpointUrl": a.endpoint_url, "healthy": a.healthy, "reported": a.reported,
        "location": [loc.country, loc.region, loc.lat, loc.lon], "labels": dict(a.labels), "agentVersion": a.agent_version,
        "capacity": {"cpuCores": c.cpu_cores, "memoryTotalBytes": c.memory_total_bytes, "executionProviders": list(c.execution_providers),
                     "gpus": [[g.index, g.model, g.memory_total_bytes] for g in c.gpus], "runtimes": list(c.runtimes)},
        "providers": list(a.providers), "assignmentVersion": a.assignment_version, "heartbeatInterval": a.heartbeat_interval,
        "via": a.via,
        "models": [[m.name, m.sha256, m.phase.value, m.message, m.provider, m.serving_sha256, m.deployment, m.variant, m.failures,
                    m.replaced_sha256] for m in a.models.values()],
    }


def _agent(d: Mapping[str, Any]) -> agent_model.AgentStatus:
    c = d["capacity"]
    # an earlier leader's rows end before replaced_sha256: its agents' word on it is not known
    models = (agent_model.ModelState(name, sha, agent_model.ModelPhase(phase), message, provider, 0, serving, deployment, variant, failures,
                                     replaced if isinstance(replaced, str) else None)
              for name, sha, phase, message, provider, serving, deployment, variant, failures, replaced
              in ([*_row(m, 9), m[9] if len(m) > 9 else None] for m in d["models"]))
    return agent_model.AgentStatus(
        site=d["site"], agent_id=d["agentId"], endpoint_url=d["endpointUrl"], healthy=d["healthy"],
        # only whether it reported since it joined is published (``reported``), not when
        last_heartbeat=1.0 if d["reported"] else 0.0, joined_at=0.0,
        location=agent_model.Location(*_row(d["location"], 4)), labels=agent_model.frozen_mapping(d["labels"]), agent_version=d["agentVersion"],
        capacity=agent_model.Capacity(c["cpuCores"], c["memoryTotalBytes"], tuple(agent_model.Gpu(*_row(g, 3)) for g in c["gpus"]),
                                      tuple(c["executionProviders"]), tuple(c.get("runtimes", ()))),  # absent from an earlier leader's
        providers=tuple(d["providers"]), inflight=0, cpu_percent=0.0, memory_available_bytes=0,
        models={m.name: m for m in models}, assignment_version=d["assignmentVersion"], heartbeat_interval=d["heartbeatInterval"],
        via=d["via"],
    )


def _apps_doc(apps: Mapping[str, serve_config.ServeAppStatus]) -> dict[str, Any]:
    return {name: {**vars(app), "status": app.status.value} for name, app in apps.items()}


def _apps(doc: Mapping[str, Any]) -> dict[str, serve_config.ServeAppStatus]:
    return {name: _known(serve_config.ServeAppStatus, app, status=serve_config.ServeAppState(app["status"])) for name, app in doc.items()}


def _datacentre_doc(d: snap.DataCentreObservation) -> dict[str, Any]:
    # lastApps: a follower's placements say what the gateway routes to while it is out of reach
    # unreachableAt: a new leader declares it lost when this one would have
    return {"reachable": d.reachable, "error": d.error, "drift": d.drift, "lost": d.lost, "refused": d.refused,
            "apps": _apps_doc(d.apps), "lastApps": None if d.last_apps is None else _apps_doc(d.last_apps),
            "unreachableAt": d.unreachable_at, "waiting": d.waiting, "ownedBy": d.owned_by}


def _datacentre(d: Mapping[str, Any]) -> snap.DataCentreObservation:
    # "refused", "lastApps", "unreachableAt", "waiting" and "ownedBy" are absent from a document an earlier leader wrote
    last = d.get("lastApps")
    return snap.DataCentreObservation(d["reachable"], _apps(d["apps"]), d["error"], d["drift"], d["lost"],
                                      last_apps=None if last is None else _apps(last), refused=d.get("refused", False),
                                      unreachable_at=d.get("unreachableAt"), waiting=d.get("waiting", False),
                                      owned_by=d.get("ownedBy"))
