"""One reconcile pass, decided purely: snapshot in, typed actions out.

The scheduler places replicas; this module turns its placement into what each site must
be told (agent assignments, Serve applications), the status users read, and the endpoint
table the gateway routes from. No I/O and no clock: the same snapshot always yields the
same actions, which is what makes a pass safe to repeat after a crash.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeplane_proto import oip
from orchestrator import maintenance as maintenance_mod
from orchestrator.adapters import serve_config
from orchestrator.agents import model as agent_model
from orchestrator.gateway import cascade_rules, routing
from orchestrator.manifests import schema
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import applications
from orchestrator.reconciler import delivery, inventory, rollout
from orchestrator.reconciler import failback as failback_mod
from orchestrator.reconciler import maintenance as drain
from orchestrator.reconciler import power as power_mod
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import planner
from orchestrator.scheduler import model as sched_model
from orchestrator.scheduler import result as sched_result
from orchestrator.scheduler import standing as standing_mod
from orchestrator.store import sqlite as store_mod

ACTOR = "scheduler"


@dataclass(frozen=True)
class PassPlan:
    actions: tuple[act.Action, ...]
    result: sched_result.PlanResult
    # The plan in force, kept for the next pass to repair a site loss without a full plan.
    standing: standing_mod.Standing | None = field(default=None, compare=False, repr=False)
    # What the failback rule knows for the next pass (the seats stand-ins stood in for).
    failback: failback_mod.Failback = field(default_factory=failback_mod.Failback, compare=False, repr=False)


def schedule(s: snap.Snapshot) -> sched_result.PlanResult:
    """Run the scheduler on the snapshot (deployments of a model not declared are left out)
    as a pass does when it plans in full (``plan_full``): what a preview shows."""
    return plan_full(s, *scheduler_inputs(s))[0]


def plan_full(s: snap.Snapshot, sites: Sequence[sched_model.Site], deployments: Sequence[sched_model.Deployment],
              current: Sequence[sched_model.Replica], returning: Sequence[sched_model.Replica] = ()
              ) -> tuple[sched_result.PlanResult, bool, dict[str, drain.Wait]]:
    """A full plan of ``s`` (``scheduler_inputs``, or those as a what-if changes them: its
    sites are sized as given): one that gives the room of replicas kept until replaced to
    newcomers is made again with that room held, so that they go elsewhere or wait. The
    plan; whether it was made again; the replicas each deployment waits for meanwhile
    (``maintenance.room_held``). ``returning``: a failback's seats (``failback``)."""
    result = planner.plan(sites, deployments, current, returning=returning)
    held = drain.room_held(s, result, placement_rows(result), lambda row, model: row_ready(s, row, model), sites)
    if not held:
        return result, False, {}
    second = planner.plan(drain.holding(sites, deployments, held), deployments, current, returning=returning)
    return second, True, drain.waits(result, second, held)


def schedule_pass(s: snap.Snapshot, standing: standing_mod.Standing | None
                  ) -> tuple[sched_result.PlanResult, standing_mod.Standing | None, dict[str, drain.Wait], failback_mod.Failback,
                             tuple[store_mod.Event, ...]]:
    """``schedule`` for a reconcile pass, with the plan in force of the one before.

    When ``standing`` is that plan (the same deployments, every replica where it put it)
    and only sites were lost or came back, it is repaired: the lost replicas move, nothing
    else does, in milliseconds. Otherwise a full plan; one that changes nothing becomes
    the standing plan the next pass may repair (the placement is at rest). One that gives
    the room of replicas kept until replaced to newcomers is made again with that room
    held: the replicas each deployment waits for meanwhile (``maintenance.room_held``).
    Where a lost site has been back for the failback hold-down, the pass plans in full with
    the seats its replicas left counted as running (``failback``). Also what the failback
    rule knows for the next pass, and this pass's ``failback`` events."""
    sites, deployments, current = scheduler_inputs(s)
    failback = s.failback.observing(s.agents)
    due = failback.due(sites)
    if due:
        result, _, waits = plan_full(s, sites, deployments, current, failback.returning(due))
    else:
        result, standing, waits = _scheduled(s, sites, deployments, current, standing)
    return result, None if due else standing, waits, failback.after(sites, result, due), failback.events(due, result)


def _scheduled(s: snap.Snapshot, sites: Sequence[sched_model.Site], deployments: Sequence[sched_model.Deployment],
               current: Sequence[sched_model.Replica], standing: standing_mod.Standing | None
               ) -> tuple[sched_result.PlanResult, standing_mod.Standing | None, dict[str, drain.Wait]]:
    """``schedule_pass``'s plan, no failback due."""
    repaired = _repaired(standing, sites, deployments, current)
    if repaired is not None:
        return repaired, standing, {}
    result, again, waits = plan_full(s, sites, deployments, current)
    if again:  # the plan's newcomers there go elsewhere or wait: not at rest
        return result, None, waits
    if result.actions:
        return result, None, {}
    try:
        return result, standing_mod.Standing(sites, deployments, current), {}
    except ValueError:  # cannot happen for a plan at rest; the next pass plans in full
        return result, None, {}


def _repaired(standing: standing_mod.Standing | None, sites: Sequence[sched_model.Site], deployments: Sequence[sched_model.Deployment],
              current: Sequence[sched_model.Replica]) -> sched_result.PlanResult | None:
    """``standing`` repaired for ``sites`` when it is the plan in force for ``deployments``
    running ``current`` and only sites were lost, came back or were added; else None."""
    if standing is None or not standing.stands_for(deployments, current):
        return None
    return standing.repair(sites)


def plan_as_pass(s: snap.Snapshot, standing: standing_mod.Standing | None, sites: Sequence[sched_model.Site],
                 deployments: Sequence[sched_model.Deployment], current: Sequence[sched_model.Replica]
                 ) -> tuple[sched_result.PlanResult, dict[str, drain.Wait], bool]:
    """How the next pass would plan ``s`` were its scheduler inputs ``sites``, ``deployments``
    and ``current`` (a what-if's), the plan in force being ``standing``, which is left as
    it is (a fork of it is repaired): ``schedule_pass``'s choice, made the same way. The
    plan; the replicas each deployment waits for meanwhile; whether it was a repair."""
    due = s.failback.observing(s.agents).due(sites)
    repaired = None if due else _repaired(standing.fork() if standing is not None else None, sites, deployments, current)
    if repaired is not None:
        return repaired, {}, True
    result, _, waits = plan_full(s, sites, deployments, current, s.failback.returning(due) if due else ())
    return result, waits, False


def drain_preview(s: snap.Snapshot, site: str) -> dict[str, Any]:
    """Where each replica of ``site`` would go were it drained now, and which would stay (``--dry-run``)."""
    draining = maintenance_mod.Maintenance(site, maintenance_mod.Mode.DRAIN)
    return drain.preview(s, site, schedule(dataclasses.replace(s, maintenance={**s.maintenance, site: draining})))


def scheduler_inputs(s: snap.Snapshot) -> tuple[list[sched_model.Site], list[sched_model.Deployment], list[sched_model.Replica]]:
    """The scheduler's sites, deployments and replicas (the room a site keeps for replicas
    kept there until replaced is ``plan_full``'s to hold: ``maintenance.holding``)."""
    deployments = [inventory.to_deployment(d, s.models[d.spec.model], _autoscaled(s, d.name)) for d in s.deployments if d.spec.model in s.models]
    planned = {d.name for d in deployments}
    current = [r for r in inventory.current_replicas(s.placements) if r.deployment in planned]
    # A data centre out of reach but not declared lost holds its replicas as a cordoned site
    # does: they most likely still serve, and one that does not answer is given nothing new.
    # So does one owned by another control plane, for as long: nothing can be applied there.
    unseen = {name for name, dc in s.datacentres.items()
              if dc.owned_by is not None or (not dc.reachable and not dc.lost)} - s.maintenance.keys()
    held = _held(s.rejoining | s.maintenance.keys() | unseen, deployments, current)
    cordoned = {name for name, m in s.maintenance.items() if not m.draining} | unseen
    draining = s.maintenance.keys() - cordoned
    sites = [inventory.to_site(r, s.agent_by_site.get(r.name), s.datacentres.get(r.name),
                               [v for _, v in held[r.name]] if r.name in s.rejoining else None,
                               cordoned=_staying(r, held[r.name], deployments) if r.name in cordoned else None,
                               draining=r.name in draining, out_of_reach=r.name in unseen, sent=s.assignments.get(r.name, ()))
             for r in s.sites]
    return sites, deployments, current


def _staying(site: snap.SiteRecord, held: list[tuple[str, sched_model.Variant]],
             deployments: list[sched_model.Deployment]) -> list[tuple[str, sched_model.Variant]]:
    """Of a cordoned site's replicas, those its deployments' rules still allow there: a
    replica that must leave (its deployment's residency, tiers or selector changed) frees
    room the site must not offer, or another replica of a deployment it runs would take it."""
    by_name = {d.name: d for d in deployments}
    tier, spec = sched_model.Tier(site.spec.tier), site.spec
    return [(name, v) for name, v in held if by_name[name].allows(v, spec.location.country, tier, site.labels)]


def _held(where: Iterable[str], deployments: list[sched_model.Deployment],
          current: list[sched_model.Replica]) -> dict[str, list[tuple[str, sched_model.Variant]]]:
    """The replicas (deployment, variant) each of the sites ``where`` holds: rejoining or
    cordoned ones (see ``inventory.to_site``)."""
    held: dict[str, list[tuple[str, sched_model.Variant]]] = {site: [] for site in where}
    variants = {(d.name, v.name): v for d in deployments for v in d.variants}
    for replica in current:
        variant = variants.get((replica.deployment, replica.variant))
        if replica.site in held and variant is not None:
            held[replica.site].append((replica.deployment, variant))
    return held


def _autoscaled(s: snap.Snapshot, deployment: str) -> int | None:
    scaled = s.autoscale.get(deployment)
    return scaled.replicas if scaled is not None else None


def placement_rows(result: sched_result.PlanResult) -> tuple[store_mod.PlacementRow, ...]:
    counts = Counter((r.deployment, r.site, r.variant) for r in result.replicas)
    return tuple(store_mod.PlacementRow(d, site, v, n) for (d, site, v), n in sorted(counts.items()))


def placement_events(result: sched_result.PlanResult) -> tuple[store_mod.Event, ...]:
    events = []
    for a in result.actions:
        if isinstance(a, sched_result.PlaceReplica):
            events.append(store_mod.Event(ACTOR, "replica-placed", "ModelDeployment", a.deployment, a.reason, {"site": a.site, "variant": a.variant}))
        elif isinstance(a, sched_result.RemoveReplica):
            events.append(store_mod.Event(ACTOR, "replica-removed", "ModelDeployment", a.deployment, a.reason, {"site": a.site, "variant": a.variant}))
        elif isinstance(a, sched_result.MoveReplica):
            events.append(store_mod.Event(ACTOR, "replica-moved", "ModelDeployment", a.deployment, a.reason,
                                          {"from": a.from_site, "to": a.to_site, "variant": a.to_variant}))
    return tuple(events)


def edge_assignments(s: snap.Snapshot, rows: Iterable[store_mod.PlacementRow]
                     ) -> tuple[dict[str, tuple[agent_model.Assignment, ...]], dict[str, rollout.Rollout]]:
    """What each edge agent should serve, and the deployments whose new version is still
    rolling out (canary steps and ``maxUnavailable``; see ``rollout``). A site whose agent
    has not reported since it joined, and was sent nothing since this control plane
    started, is left out: nothing is pushed to it until its first heartbeat says what it serves."""
    deployments = s.deployment_by_name
    tiers = {r.name: r.spec.tier for r in s.sites}
    out: dict[str, dict[str, agent_model.Assignment]] = {r.name: {} for r in s.sites if r.spec.tier == "edge"}
    for site in s.agent_by_site:
        if site not in tiers:  # an agent whose Site was deleted serves nothing (its replicas left the plan)
            out[site] = {}
    # One agent serves a model once, under its Model name: the first deployment (by name) wins.
    winner: dict[tuple[str, str], str] = {}
    for row in sorted(rows, key=lambda r: (r.deployment, r.variant)):
        if tiers.get(row.site) == "edge" and row.deployment in deployments:
            winner.setdefault((row.site, deployments[row.deployment].spec.model), row.deployment)
    groups: dict[tuple[str, str], list[str]] = {}  # (deployment, variant) -> its edge sites
    for row in rows:
        d = deployments.get(row.deployment)
        if tiers.get(row.site) == "edge" and d is not None and winner[(row.site, d.spec.model)] == row.deployment:
            groups.setdefault((row.deployment, row.variant), []).append(row.site)
    rollouts: dict[str, rollout.Rollout] = {}
    held: set[str] = set()
    for (name, variant_name), sites in sorted(groups.items()):
        d = deployments[name]
        model = d.spec.model
        variant = applications.variant(s, d, variant_name)
        ref = s.artifacts.get((model, variant_name))
        if variant is None or variant.artifact is None or ref is None or ref.url is None:
            continue
        sent = {site: _sent(s, site, model) for site in sites}
        decision = rollout.plan(d.spec.rollout, model, variant.artifact.sha256, sites, s.agent_by_site, sent)
        if decision.rollout is not None and not decision.rollout.done:
            rollouts[name] = decision.rollout
        held |= decision.held
        for site in sites:
            if site in decision.new:
                sha, url = variant.artifact.sha256, ref.url
            elif site in decision.kept:  # waiting for its turn: the version it serves (cached there)
                # From this control plane when it knows the version's source, else from
                # where it was sent (to this site, or to another: a site placed while a
                # rollout is halted has never had it); "" if to none since this control
                # plane started, and the site serves it from its cache. Never the current
                # variant's URL: its bytes have another sha256.
                sha = decision.kept[site]
                url = s.versions.get(sha) or s.urls_sent.get((model, sha), "")
            else:
                continue
            g = variant.generative
            # the declaration is of the version the variant names: a kept one may take other tensors
            declared = variant.runtime == "onnx" and sha == variant.artifact.sha256
            out[site][model] = agent_model.Assignment(
                model=model, deployment=name, variant=variant_name, artifact_url=url, sha256=sha, runtime=variant.runtime,
                max_concurrent_sequences=g.maxConcurrentSequences if g else 0, max_queued=g.maxQueued if g else 0,
                artifact_hosts=ref.hosts, inputs=declared_tensors(variant.inputs) if declared else (),
                outputs=declared_tensors(variant.outputs) if declared else (),
                replace_when_full=d.spec.rollout.strategy == "replaceWhenFull")
    return {site: tuple(sorted(a.values(), key=lambda x: x.model)) for site, a in out.items() if site not in held}, rollouts


def declared_tensors(specs: Iterable[schema.TensorSpec]) -> tuple[agent_model.DeclaredTensor, ...]:
    """A variant's declared ``inputs`` or ``outputs`` as an agent (or ONNX application) checks a file against them."""
    return tuple(agent_model.DeclaredTensor(t.name, t.datatype, tuple(t.shape)) for t in specs)


def _sent(s: snap.Snapshot, site: str, model: str) -> agent_model.Assignment | None:
    return next((a for a in s.assignments.get(site, ()) if a.model == model), None)


def serves_for(state: agent_model.ModelState, deployment: str, sent: Iterable[agent_model.Assignment]) -> bool:
    """Whether an agent's model (``state``) answers for ``deployment``: it says it serves it
    for that deployment (or for none: an older agent), or serves the very bytes of the
    assignment ``sent`` to it for that deployment. A deployment replaced by another of the
    same model is served on by the same loaded model: the agent's next heartbeat names the
    new deployment, and its callers must not wait for it."""
    if not state.serving:
        return False
    return state.deployment in ("", deployment) or any(
        a.model == state.name and a.deployment == deployment and a.sha256 == state.serving_sha256 for a in sent)


def endpoints(s: snap.Snapshot, rows: Iterable[store_mod.PlacementRow],
              assigned: Mapping[str, tuple[agent_model.Assignment, ...]] | None = None) -> tuple[routing.Endpoint, ...]:
    """Replicas that can answer now: only where the current placement puts them.
    ``assigned``: what this pass sends each edge agent (``edge_assignments``), where it
    sends any; the others answer by what they were last sent."""
    deployments, sites, agents = s.deployment_by_name, s.site_by_name, s.agent_by_site
    # One endpoint per Serve application in a data centre (one per variant placed there); an
    # edge agent serves a model once, at one URL.
    edge = {r.name for r in s.sites if r.spec.tier == "edge"}
    placed = {(r.deployment, r.site, "" if r.site in edge else r.variant): r.variant for r in rows}
    out: list[routing.Endpoint] = []
    for (deployment_name, site_name, _), variant_name in sorted(placed.items()):
        d, site = deployments.get(deployment_name), sites.get(site_name)
        if d is None or site is None:
            continue
        loc = site.spec.location
        v = applications.variant(s, d, variant_name)
        api = routing.API_OPENAI if v is not None and v.runtime in ("onnx-genai", "vllm") else routing.API_V2
        common = dict(model=d.spec.model, deployment=d.name, site=site.name, tier=site.spec.tier, country=loc.country, api=api,
                      region=loc.region or "", lat=loc.lat, lon=loc.lon,
                      allowed_countries=inventory.allowed_countries(d.spec), fallback=tuple(d.spec.routing.fallback))
        if site.spec.tier == "edge":
            agent = agents.get(site.name)
            if site.name in s.rejoining:  # where it answered before the restart, until its agent is back and has reported
                out.extend(_remembered(s.remembered.get(site.name, ()), d, agent, common))
                continue
            state = agent.models.get(d.spec.model) if agent else None
            sent = (assigned or {}).get(site.name, s.assignments.get(site.name, ()))
            if agent is None or state is None or not serves_for(state, d.name, sent):
                continue
            out.append(routing.Endpoint(url=agent.endpoint_url.rstrip("/"), healthy=agent.healthy, inflight=agent.inflight,
                                        version=oip.model_version(state.serving_sha256),
                                        auth=routing.AUTH_TOKEN if agent.checks_tokens else routing.AUTH_NONE, **common))
        else:
            dc = s.datacentres.get(site.name)
            app = dc.routed.get(applications.app_name(site.name, d.name, variant_name)) if dc else None
            if app is None or app.endpoint_url is None or app.replicas_running < 1:
                continue
            if v is not None and v.llm is not None:  # Ray Serve LLM: OpenAI routes under the route prefix
                common.update(served_model=v.llm.servedModelName or d.spec.model, lora=v.llm.lora is not None)
            out.append(routing.Endpoint(url=app.endpoint_url.rstrip("/"), healthy=app.answers, version=app.version, **common))
    return tuple(out)


def _remembered(remembered: Iterable[routing.Endpoint], d: snap.DeploymentRecord, agent: agent_model.AgentStatus | None,
                common: Mapping[str, Any]) -> Iterator[routing.Endpoint]:
    """A rejoining site's endpoints of ``d`` as the table had them when the control plane
    started: until its agent is back, and once it has joined, until its first heartbeat says
    what it serves (the join does not), at the address it joined from only."""
    for e in remembered:
        if e.deployment != d.name or e.model != d.spec.model:
            continue
        if agent is None:
            yield routing.Endpoint(url=e.url, healthy=e.healthy, auth=e.auth, **common)
        elif e.url == agent.endpoint_url.rstrip("/"):
            yield routing.Endpoint(url=e.url, healthy=agent.healthy,
                                   auth=routing.AUTH_TOKEN if agent.checks_tokens else routing.AUTH_NONE, **common)


def ready_replicas(s: snap.Snapshot, mine: Iterable[store_mod.PlacementRow], model: str) -> int:
    """Replicas of one deployment (its placement rows: ``mine``) that answer now."""
    return sum(row_ready(s, row, model) for row in mine)


def row_ready(s: snap.Snapshot, row: store_mod.PlacementRow, model: str | None) -> int:
    """How many replicas of one placement row answer now: on an edge site, all of them
    when its healthy agent serves ``model`` for this row's deployment (an agent serves a
    model once, for the first deployment by name: see ``assignments``); in a data centre,
    those the row's own Serve application runs (one per variant placed on the site)."""
    site = s.site_by_name.get(row.site)
    if site is not None and site.spec.tier == "edge":
        agent = s.agent_by_site.get(row.site)
        state = agent.models.get(model) if agent is not None and model is not None else None
        return row.replicas if (agent is not None and agent.healthy and state is not None
                                and serves_for(state, row.deployment, s.assignments.get(row.site, ()))) else 0
    dc = s.datacentres.get(row.site)
    app = dc.apps.get(applications.app_name(row.site, row.deployment, row.variant)) if dc is not None and dc.reachable else None
    return min(row.replicas, app.replicas_running) if app is not None else 0


def deployment_status(s: snap.Snapshot, d: snap.DeploymentRecord, plan: sched_result.DeploymentPlan | None,
                      mine: list[store_mod.PlacementRow], rolling: rollout.Rollout | None = None,
                      stays: Collection[drain.Stay] = (), handovers: Collection[drain.Handover] = (),
                      wait: drain.Wait | None = None, unapplied: str = "") -> dict[str, Any]:
    """What ``get``/``describe`` show for ``d``; ``mine`` are its placement rows, ``stays``
    its replicas a drain keeps for want of another allowed site: placed and serving still,
    they count, and the deployment is short of nothing while they stay. ``handovers``: its
    replicas kept on sites the plan moved them off until their replacements serve, which
    leave the counts (their replacements are counted) and keep it Progressing. ``wait``: its
    replicas that wait for room such replicas hold, which come once they leave: Progressing too.
    ``unapplied``: why its Serve applications that could not be rendered were not applied."""
    if plan is None:
        return {"phase": "Invalid", "reason": f"Model {d.spec.model!r} does not exist", "observedGeneration": d.generation}
    problems: list[str] = []  # make the deployment Failing
    notes: list[str] = []  # shown, but the replicas may still come (e.g. waiting for a GPU node)
    if unapplied:
        problems.append(unapplied)
    for r in mine:
        ref = s.artifacts.get((d.spec.model, r.variant))
        if ref is not None and ref.error:
            problems.append(ref.error)
        dc = s.datacentres.get(r.site)
        if dc is not None:
            app = dc.apps.get(applications.app_name(r.site, d.name, r.variant))
            if dc.waiting:  # not known yet to fail: its replicas may well come
                notes.append(f"{r.site}: {dc.error}")
            elif not dc.reachable or dc.refused:  # a refused apply is the operator's to fix; a retryable one is retried
                problems.append("; ".join(filter(None, [f"{r.site}: {dc.error}", dc.routed_unseen(applications.app_name(r.site, d.name, r.variant))])))
            elif app is not None and app.status in (serve_config.ServeAppState.DEPLOY_FAILED, serve_config.ServeAppState.UNHEALTHY):
                problems.append(f"{r.site}: {app.status.value}: {app.message}")
            elif app is not None and app.message and app.replicas_running < app.replicas_target:
                notes.append(f"{r.site}: {app.message}")
    if rolling is not None and rolling.failed:
        problems.append(rolling.status()["halted"])
    leaving = Counter[tuple[str, str]]()
    for x in handovers:
        leaving[(x.site, x.variant)] += x.replicas
    ready = sum(max(0, row_ready(s, r, d.spec.model) - leaving[(r.site, r.variant)]) for r in mine)
    placed = plan.placed + sum(x.replicas for x in stays)
    phase, why = str(plan.status), plan.reason
    if stays:  # their note says why they stay; the scheduler's count leaves them out
        notes.extend(x.note() for x in stays)
        why = "" if placed >= plan.wanted else f"{placed} of {plan.wanted} placed"
        if placed >= plan.wanted:
            phase = str(sched_result.Status.SCHEDULED)
    notes.extend(x.note() for x in (*handovers, *([wait] if wait else [])))
    if wait is not None and wait.schedulable and phase == "Unschedulable":
        phase, why = "Progressing", f"{placed} of {plan.wanted} placed"
    if phase != "Unschedulable" and (ready < placed or handovers):
        phase = "Progressing" if not problems else "Failing"
    elif phase == "Scheduled" and ready >= placed:
        phase = "Running"
    if rolling is not None and phase == "Running":  # every replica answers, some on the old version
        phase = "Failing" if rolling.failed else "Progressing"
    scaled = s.autoscale.get(d.name)
    if phase == "Running" and placed == 0 and scaled is not None and scaled.replicas == 0:
        phase = "ScaledToZero"
    reason = "; ".join(dict.fromkeys(x for x in [*problems, *notes, why] if x))
    status = {
        "phase": phase,
        "reason": reason,
        "replicas": placed,
        "wantedReplicas": plan.wanted,
        "readyReplicas": ready,
        "sites": sorted({f"{r.site}:{r.variant}x{r.replicas}" for r in mine}),
        "observedGeneration": d.generation,
    }
    if (model_generation := s.model_generations.get(d.spec.model)) is not None:
        status["modelGeneration"] = model_generation  # the Model's spec this status was computed against
    if scaled is not None:
        status["autoscaling"] = scaled.status()
    if rolling is not None:
        status["rollout"] = rolling.status()
    return status


def site_status(s: snap.Snapshot, record: snap.SiteRecord) -> dict[str, Any]:
    agent, dc = s.agent_by_site.get(record.name), s.datacentres.get(record.name)
    _, health = inventory.site_health(record, agent, dc, record.name in s.rejoining)
    status: dict[str, Any] = {"health": health}
    if agent is not None:
        caps = agent.capacity
        status.update({
            "capacitySource": "measured",
            "capacity": {"cpu": caps.cpu_cores, "memoryGiB": round(caps.memory_total_bytes / inventory.GIB, 2),
                         "gpus": [{"model": g.model, "count": g.count, "memoryGiB": g.memory_gib} for g in inventory.measured_gpus(caps)]},
            "agent": {"id": agent.agent_id, "endpoint": agent.endpoint_url, "version": agent.agent_version,
                      "runtimes": sorted(inventory.agent_runtimes(agent, s.assignments.get(record.name, ()))),
                      "providers": list(agent.providers), "models": {n: m.phase.value for n, m in sorted(agent.models.items())}},
        })
    elif record.spec.capacity is not None:
        status["capacitySource"] = "declared"
    if dc is not None and dc.error and not dc.waiting:
        status["error"] = dc.error
    if dc is not None and dc.owned_by is not None:
        status["ownedBy"] = dc.owned_by
    return status


def still_serving(s: snap.Snapshot, site: str) -> bool:
    """Whether ``site`` still answers for some model: its agent serves one, or its data
    centre runs applications of its own, or still has some this control plane applied. A
    lost agent answers no one (the gateway routes nothing to it), whatever it last reported.
    A data centre out of reach is judged by what it ran when this leader last saw it; not
    seen since this leader took over, it may run anything (it knows of no apply) and counts
    as serving. Either way it serves no more once declared lost, by the rule that declares
    an agent lost (``DataCentreObservation.lost``). One another control plane owns runs
    nothing of this one's (as deleting its Site removes nothing there), and is never lost."""
    agent = s.agent_by_site.get(site)
    if agent is not None and agent.healthy and any(m.serving for m in agent.models.values()):
        return True
    dc, owns = s.datacentres.get(site), applications.owns_app(site)
    if dc is not None and dc.owned_by is not None:
        return False
    if dc is not None and not dc.reachable and (dc.lost or dc.last_apps is None):
        return not dc.lost
    seen = {} if dc is None else dc.apps if dc.reachable else dc.last_apps or {}
    return bool(s.applied_apps.get(site)) or any(owns(n) and a.replicas_running for n, a in seen.items())


def plan_pass(s: snap.Snapshot, standing: standing_mod.Standing | None = None) -> PassPlan:
    """The pass's actions, in the order the loop runs them: the placement written first (the
    intent), then the routing that follows from it, before anything that waits on an agent
    or a data centre: a Ray dashboard's calls take seconds, and until the table is replaced
    the gateway routes by the last one, to a replica the placement just took away (a
    stricter residency's, say)."""
    result, standing, waits, failback, failed_back = schedule_pass(s, standing)
    def ready(row: store_mod.PlacementRow, model: str) -> int:
        return row_ready(s, row, model)
    planned = placement_rows(result)
    rows, drains, handovers = drain.keep_until_replaced(s, result, planned, ready)
    assigned, rollouts = edge_assignments(s, rows)
    rows_of: dict[str, list[store_mod.PlacementRow]] = {}
    for row in rows:
        rows_of.setdefault(row.deployment, []).append(row)
    deployed: dict[str, str] = {}
    cold: set[str] = set()
    starting: set[str] = set()
    statuses: list[act.SetStatus] = []
    stays = drain.stays(drains)
    serve = applications.serve_apps(s, rows)
    for d in s.deployments:
        status = deployment_status(s, d, result.deployments.get(d.name), rows_of.get(d.name, []), rollouts.get(d.name),
                                   stays.get(d.name, ()), handovers.get(d.name, ()), waits.get(d.name), serve.unapplied.get(d.name, ""))
        statuses.append(act.SetStatus("ModelDeployment", d.name, status, d.created_at))
        deployed[d.spec.model] = f"deployment {d.name} is {status['phase']}: {status['reason']}"
        if status["phase"] == "Progressing":
            starting.add(d.spec.model)
        if d.spec.autoscaling is not None and d.spec.replicas.min == 0 and not status.get("readyReplicas"):
            cold.add(d.spec.model)  # scaled to zero, or on its way up from zero
    power = power_mod.site_power(s, rows)
    statuses.extend(act.SetStatus("Site", r.name, {**site_status(s, r), **({"power": power[r.name]} if r.name in power else {}),
                                                   **drain.site_status(s, r.name, drains, r.name in drains and still_serving(s, r.name))},
                                  r.created_at)
                    for r in s.sites)
    out: list[act.Action] = []
    if rows != tuple(s.placements):
        out.append(act.RecordPlacement(rows, failed_back + drain.events(s, result, planned, rows, placement_events(result), ready)))
    regions = routing.RegionIndex.from_points((r.spec.location.region or "", r.spec.location.lat, r.spec.location.lon) for r in s.sites)
    pushes = delivery.pushes(s, assigned)  # the others keep what they were last sent
    out.append(act.PublishEndpoints(endpoints(s, rows, {p.site: p.assignments for p in pushes}), regions, deployed, frozenset(cold),
                                    frozenset(starting)))
    out.append(act.PublishCascades(cascade_routes(s)))
    out.extend(pushes)
    out.extend(act.ForgetAgent(site) for site in delivery.agents_to_forget(s.agents, s.site_by_name, s.assignments, pushes))
    for site, apps in serve.by_site.items():
        dc = s.datacentres.get(site)
        if apps != s.applied_apps.get(site) or (dc is not None and (not dc.reachable or dc.drift)):
            out.append(act.ApplyServeApps(site, apps, dc.drift if dc is not None else ""))
    out.append(act.ReportUnapplied(serve.unapplied))
    out.append(act.SetStatuses(tuple(statuses)))
    return PassPlan(tuple(out), result, standing, failback)


def cascade_routes(s: snap.Snapshot) -> dict[str, cascade_rules.CascadeRoute]:
    """The gateway's cascades, by model and by deployment name: each stage's tiers, rule and power per replica, and
    each site's grid intensity and PUE (for the energy and gCO2 of each request)."""
    energy = {r.name: cascade_rules.SiteEnergy(r.spec.energy.carbonGramsPerKWh if r.spec.energy else inventory.DEFAULT_CARBON_G_PER_KWH,
                                               r.spec.energy.pue if r.spec.energy else 1.0) for r in s.sites}
    routes = []
    for d in s.deployments:
        model = s.models.get(d.spec.model)
        if d.spec.cascade is None or model is None:
            continue
        watts = {v.name: inventory.to_variant(v).watts for v in model.variants}
        if (route := cascade_rules.route_of(d.name, d.spec, watts, energy, d.created)) is not None:
            routes.append(route)
    return cascade_rules.routes_by_name(routes)
