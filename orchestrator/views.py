"""Read models the API serves: plan previews, live placements, endpoint lists, describe.

Each is a pure function of a reconcile snapshot (plus, for previews, the documents being
applied), so ``plan`` shows exactly what the next pass would do with the same inputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import replace
from typing import Any

from edgeplane_proto import oip
from orchestrator.gateway import wire
from orchestrator.manifests import loader, schema
from orchestrator.reconciler import applications, hold, inventory, maintenance, planning, power
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import result as sched_result


def overlay(s: snap.Snapshot, docs: Iterable[loader.LoadedDocument]) -> snap.Snapshot:
    """The snapshot as it would be once ``docs`` are applied."""
    sites = {r.name: r for r in s.sites}
    models = dict(s.models)
    deployments = {d.name: d for d in s.deployments}
    autoscale = dict(s.autoscale)
    for d in docs:
        if isinstance(d.doc, schema.SiteDoc):
            sites[d.name] = snap.SiteRecord(d.name, dict(d.doc.metadata.labels), d.doc.spec)
        elif isinstance(d.doc, schema.ModelDoc):
            models[d.name] = d.doc.spec
        elif isinstance(d.doc, schema.ModelDeploymentDoc):
            old = deployments.get(d.name)
            deployments[d.name] = snap.DeploymentRecord(d.name, (old.generation + 1) if old else 1, d.doc.spec,
                                                        old.created if old else None)
            if d.doc.spec.autoscaling is None:
                # the next pass has no count for it (the autoscaler evaluates autoscaled specs
                # only): it is sized from its demand. A count kept under changed settings is
                # what that pass starts from too, held through the scale-down delay.
                autoscale.pop(d.name, None)
    return replace(s, sites=tuple(sites.values()), models=models, deployments=tuple(deployments.values()), autoscale=autoscale)


def preview(current: snap.Snapshot, docs: list[loader.LoadedDocument]) -> dict[str, Any]:
    """The next pass's plan once ``docs`` are applied, set against the placement in force
    (``current``'s rows): the changes' before and "now" energy alike, a replica kept while
    its replacement starts included. A deployment that waits for room such a replica holds
    says so, ``Progressing`` where it comes once that room is free, as the pass's status does."""
    future = overlay(current, docs)
    result, _, waits = planning.plan_full(future, *planning.scheduler_inputs(future))
    before = Counter({(r.deployment, r.site, r.variant): r.replicas for r in current.placements})
    after = Counter((r.deployment, r.site, r.variant) for r in result.replicas)
    moved_sites = {a.from_site for a in result.actions if isinstance(a, sched_result.MoveReplica)} | {
        a.to_site for a in result.actions if isinstance(a, sched_result.MoveReplica)}
    changes = []
    for key in sorted(set(before) | set(after), key=lambda k: (k[1], k[0], k[2])):
        deployment, site, variant = key
        b, a = before.get(key, 0), after.get(key, 0)
        # replicas kept on the site take the new file, or Ray Serve rolls them, whatever its count does
        roll = _version_roll(current, future, deployment, site, variant) if a and b else {}
        if a and b and not roll and (updated := applications.serve_update(current, future, site, deployment, variant)):
            roll = {"updated": updated}
        if a == b:
            change = "new version" if "version" in roll else "updated" if roll else "unchanged"
        elif site in moved_sites:
            change = "moved in" if a > b else "moved out"
        else:
            change = "added" if a > b else "removed"
        changes.append({"site": site, "deployment": deployment, "variant": variant, "before": b, "after": a, "change": change,
                        **roll, **_replica_gpus(future, deployment, variant)})
    now = power.placement_energy(current, current.placements)
    energy = {"watts": result.energy.watts, "gramsCO2PerHour": result.energy.g_co2_per_hour,
              "currentWatts": now.watts, "currentGramsCO2PerHour": now.g_co2_per_hour}
    return {
        "changes": changes,
        "deployments": [
            {"name": p.name, **planned_phase(p, waits.get(p.name)), "replicas": p.placed, "wanted": p.wanted,
             "replicaReasons": [{"site": r.site, "variant": r.variant, "reason": r.reason} for r in p.replicas]}
            for p in result.deployments.values()
        ],
        "latency": [
            {"deployment": x.deployment, "demand": x.point, "rps": x.rps, "site": x.site, "ms": _ms(x.rtt_ms)}
            for p in result.deployments.values() for x in p.latency
        ],
        "energy": energy,
        **held(current),
    }


def planned_phase(plan: sched_result.DeploymentPlan, wait: maintenance.Wait | None) -> dict[str, str]:
    """A planned deployment's phase and reason, and its replicas that wait for held room (``deployment_status``'s words)."""
    if wait is None:
        return {"phase": str(plan.status), "reason": plan.reason}
    schedulable = wait.schedulable and plan.status == sched_result.Status.UNSCHEDULABLE
    return {"phase": "Progressing" if schedulable else str(plan.status),
            "reason": f"{wait.note()}; {f'{plan.placed} of {plan.wanted} placed' if schedulable else plan.reason}"}


def held(current: snap.Snapshot) -> dict[str, str]:
    """``hold``, why nothing planned takes effect until the hold ends, when changes are on hold."""
    why = hold.reason(current.unreadable)
    return {"hold": why} if why is not None else {}


def _ms(value: float | None) -> float | None:
    """Predicted latencies to a tenth of a millisecond: the model is not finer than that."""
    return None if value is None else round(value, 1)


def _version_roll(current: snap.Snapshot, future: snap.Snapshot, deployment: str, site: str, variant: str) -> dict[str, str]:
    """``previousVersion`` and ``version`` (and ``previousModel`` and ``model`` when the
    deployment names another Model) of replicas kept on ``site`` that would take another
    model file: the version the site's agent serves (the one a halted rollout keeps there),
    else the one the Model names now, against the one it would name; on an edge site, the
    deployment's ``strategy`` when it is not make-before-break. Empty when they agree, or
    when the variant has no artifact (a ray-serve application's own update)."""
    before, after = _artifact(current, deployment, variant), _artifact(future, deployment, variant)
    if before is None or after is None:
        return {}
    agent = current.agent_by_site.get(site)
    state = agent.models.get(before[0]) if agent is not None else None
    if state is not None and state.serving_sha256:
        before = (before[0], state.serving_sha256)
    if before == after:
        return {}
    roll = {"previousVersion": oip.model_version(before[1]), "version": oip.model_version(after[1])}
    if before[0] != after[0]:
        roll.update(previousModel=before[0], model=after[0])
    record, tier = future.deployment_by_name[deployment], future.site_by_name.get(site)
    if record.spec.rollout.strategy != "makeBeforeBreak" and tier is not None and tier.spec.tier == "edge":
        roll["strategy"] = record.spec.rollout.strategy  # its agent may unload the old version first
    return roll


def _artifact(s: snap.Snapshot, deployment: str, variant: str) -> tuple[str, str] | None:
    """(model, sha256) of the file ``deployment``'s ``variant`` serves in ``s``; None without one."""
    record = s.deployment_by_name.get(deployment)
    model = s.models.get(record.spec.model) if record is not None else None
    v = next((x for x in model.variants if x.name == variant), None) if model is not None else None
    return (record.spec.model, v.artifact.sha256) if record is not None and v is not None and v.artifact is not None else None


def _replica_gpus(s: snap.Snapshot, deployment: str, variant: str) -> dict[str, Any]:
    """What one replica takes of GPUs: how many, and how much memory on each (a vllm
    variant's from its memory model, see ``scheduler.gpu_memory``)."""
    record = s.deployment_by_name.get(deployment)
    model = s.models.get(record.spec.model) if record is not None else None
    v = next((x for x in model.variants if x.name == variant), None) if model is not None else None
    if v is None:
        return {}
    if v.llm is not None:
        memory = inventory.llm_memory(v.llm)
        return {"gpusPerReplica": memory.gpus, "gpuMemoryGiBPerGpu": round(memory.per_gpu_gib, 2),
                "gpuModel": v.llm.acceleratorType}
    if not v.resources.gpus:
        return {}
    # an onnx-genai variant without a figure takes what its weights and KV cache need
    return {"gpusPerReplica": v.resources.gpus, "gpuMemoryGiBPerGpu": round(v.gpu_memory_gib(), 2)}


def placements(s: snap.Snapshot | None, rows: Iterable[Any]) -> dict[str, Any]:
    rows = list(rows)
    holding = {(r.deployment, r.site) for r in (*rows, *(s.placements if s is not None else ()))}
    items = []
    for r in rows:
        item: dict[str, Any] = {"deployment": r.deployment, "site": r.site, "variant": r.variant, "replicas": r.replicas}
        if s is not None:
            item.update(_replica_state(s, r, holding))
        items.append(item)
    return {"items": items}


def _replica_state(s: snap.Snapshot, row: Any, holding: Collection[tuple[str, str]]) -> dict[str, Any]:
    """What one placement row's replicas do; ``holding``: the (deployment, site) pairs placed."""
    site = s.site_by_name.get(row.site)
    if site is None:
        return {"state": "SiteGone"}
    deployment = s.deployment_by_name.get(row.deployment)
    ready = planning.row_ready(s, row, deployment.spec.model if deployment else None)
    # an artifact the control plane cannot resolve is sent nowhere: say so, not "on its way"
    ref = s.artifacts.get((deployment.spec.model, row.variant)) if deployment else None
    unsent = {"state": "ArtifactError", "ready": 0, "reason": f"not sent: {ref.error}"} if ref is not None and ref.url is None else None
    if site.spec.tier == "edge":
        agent = s.agent_by_site.get(row.site)
        if agent is None and row.site in s.rejoining:
            return {"state": "Rejoining", "ready": 0, "reason": "kept while the site's agent reconnects to this restarted control plane"}
        if agent is None:
            return {"state": "NoAgent", "ready": 0, "reason": "no edge agent has joined this site"}
        state = agent.models.get(deployment.spec.model) if deployment else None
        if state is not None and state.deployment not in ("", row.deployment) and not ready:
            # A conflict only while the other deployment holds the site: one deleted or moved
            # away hands the loaded model over at the agent's next assignment.
            if state.deployment in s.deployment_by_name and (state.deployment, row.site) in holding:
                return {"state": "Conflict", "ready": 0,
                        "reason": f"not sent: the agent serves model {state.name} for deployment {state.deployment} "
                                  "(an agent serves a model once, for the first deployment by name)"}
            return unsent or {"state": "Assigned", "ready": 0,
                              "reason": f"the agent serves model {state.name} for deployment {state.deployment}, "
                                        "which no longer holds this site, until it takes this one"}
        if state is None:
            return unsent or {"state": "Assigned", "ready": 0, "reason": "sent to the agent, which has not reported the model yet"}
        out = {"state": state.phase.value if agent.healthy else "AgentUnhealthy", "ready": ready, "provider": state.provider}
        return out | ({"reason": state.message} if state.message and ready < row.replicas else {})
    dc = s.datacentres.get(row.site)
    if dc is not None and dc.waiting:
        return {"state": "Waiting", "ready": 0, "reason": dc.error}
    if dc is None or not dc.reachable:
        why = dc.error if dc is not None and dc.error else "the data centre does not answer"
        # not seen, so not counted ready; but not gone either: the gateway still routes to it
        routed = dc.routed_unseen(applications.app_name(row.site, row.deployment, row.variant)) if dc is not None else ""
        state = "OwnedElsewhere" if dc is not None and dc.owned_by is not None else "Unreachable"
        return {"state": state, "ready": 0, "reason": "; ".join(filter(None, [why, routed]))}
    app = dc.apps.get(applications.app_name(row.site, row.deployment, row.variant))
    if app is None:
        return unsent or {"state": "Pending", "ready": 0, "reason": "the Serve application is not deployed yet"}
    # a replica waiting (for a GPU, say) says why, as Ray Serve reports it
    return {"state": app.status.value, "ready": ready} | ({"reason": app.message} if app.message and ready < row.replicas else {})


endpoint_list = wire.endpoint_list  # one shape, served by the control plane and by standalone gateways


def describe_deployment(plan: planning.PassPlan | None, name: str) -> dict[str, Any]:
    if plan is None or name not in plan.result.deployments:
        return {}
    p = plan.result.deployments[name]
    return {
        "placement": {
            "status": str(p.status), "wanted": p.wanted, "placed": p.placed, "reason": p.reason,
            "replicas": [{"site": r.site, "variant": r.variant, "kept": r.kept, "reason": r.reason} for r in p.replicas],
            "latency": [{"demand": x.point, "site": x.site, "ms": _ms(x.rtt_ms)} for x in p.latency],
            "notes": list(p.notes),
        }
    }
