"""Map validated manifests plus observed state onto the scheduler's input values.

This is where "an agent's measured capacity wins over the declared one", where an edge
site without a live agent becomes unhealthy, where an edge site runs the runtimes its agent
runs, and where ``EU`` becomes 27 countries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from orchestrator.agents import model as agent_model
from orchestrator.manifests import schema
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import gpu_memory
from orchestrator.scheduler import model as sched
from orchestrator.scheduler import residency

#: Grid intensity assumed for a site that declares no energy figures (gCO2/kWh).
DEFAULT_CARBON_G_PER_KWH = 300.0
GIB = 1024**3


def measured_gpus(capacity: agent_model.Capacity) -> tuple[sched.GpuGroup, ...]:
    groups: dict[tuple[str, float], int] = {}
    for g in capacity.gpus:
        key = (g.model, round(g.memory_total_bytes / GIB, 1))
        groups[key] = groups.get(key, 0) + 1
    return tuple(sched.GpuGroup(m, n, mem) for (m, mem), n in sorted(groups.items()))


#: What an agent that reports no runtimes runs: one of a release before agents reported them,
#: most of which ran no generative model (onnx-genai came later, and needs onnxruntime-genai).
LEGACY_RUNTIMES = frozenset({sched.Runtime.ONNX})
RUNTIME_NAMES = frozenset(r.value for r in sched.EDGE_RUNTIMES)


def agent_runtimes(agent: agent_model.AgentStatus, sent: Iterable[agent_model.Assignment] = ()) -> frozenset[sched.Runtime]:
    """The runtimes ``agent``'s site runs replicas of: those it reports (a name this release
    does not know is left out). One that reports none is of a release before agents reported
    them: it runs ``LEGACY_RUNTIMES``, and the runtime of any model it serves of those it was
    ``sent`` (it evidently runs that one), so that a control plane upgraded before its agents
    leaves their generative models where they serve."""
    if agent.capacity.runtimes:
        return frozenset(sched.Runtime(r) for r in agent.capacity.runtimes if r in RUNTIME_NAMES)
    serving = {a.runtime for a in sent if (m := agent.models.get(a.model)) is not None and m.serving}
    return LEGACY_RUNTIMES | {sched.Runtime(r) for r in serving if r in RUNTIME_NAMES}


def site_health(record: snap.SiteRecord, agent: agent_model.AgentStatus | None, dc: snap.DataCentreObservation | None,
                rejoining: bool = False) -> tuple[bool, str]:
    """Whether the scheduler may keep and place replicas at the site, and the status's word
    for it. ``rejoining``: an edge site whose agent served before this control plane
    started and has not come back yet keeps its replicas meanwhile. A data centre out of
    reach keeps its replicas until it is declared lost (``DataCentreObservation.lost``), as
    an agent keeps them through a missed heartbeat: its cluster most likely still serves
    (an API server restarting, a dropped connection), and moving off rebuilds elsewhere what
    runs there, then deletes it once it answers. One not observed yet (its first observation
    still running) is ``Waiting``: held alike, nothing known of it to route to. One whose
    cluster is marked as another control plane's is ``OwnedElsewhere``: it answers, and is
    held alike for as long (never lost), this control plane changing nothing there."""
    if record.spec.tier == "edge":
        if agent is None:
            return (True, "Rejoining") if rejoining else (False, "NoAgent")
        return (True, "Healthy") if agent.healthy else (False, "Unhealthy")
    if dc is not None and dc.owned_by is not None:
        return True, "OwnedElsewhere"
    if dc is not None and not dc.reachable:
        return not dc.lost, "Waiting" if dc.waiting else "Unreachable"
    return True, "Healthy"


def to_site(record: snap.SiteRecord, agent: agent_model.AgentStatus | None, dc: snap.DataCentreObservation | None,
            rejoining: Sequence[sched.Variant] | None = None, *,
            cordoned: Sequence[tuple[str, sched.Variant]] | None = None, draining: bool = False,
            out_of_reach: bool = False, sent: Iterable[agent_model.Assignment] = ()) -> sched.Site:
    """The scheduler's view of a site. ``rejoining``: the site is rejoining (see
    ``site_health``) and holds replicas of these variants; until its agent reports its
    capacity again, the site is as big as they are (its declared capacity may be missing, as
    for a site its agent registered, or smaller than what the agent measured): it keeps them
    and takes nothing new. ``cordoned``: a site cordoned for maintenance, which holds these
    replicas (deployment, variant) and takes nothing new whatever its capacity: it is as big
    as they are, and admits as many of each (deployment, variant) as it holds and no other,
    so that the room a replica moving off it frees is taken by no replica at all. ``draining``: being drained,
    its replicas are placed elsewhere. ``out_of_reach``: a data centre held as ``cordoned``
    because it does not answer, not for maintenance (a reason says so, and since when ``dc``
    was first found so). The room it holds for replicas that leave it once their
    replacements serve (``Site.held``) is the reconciler's to add (``maintenance.holding``).
    ``sent``: what the site's agent was last sent (``agent_runtimes``)."""
    spec = record.spec
    healthy, _ = site_health(record, agent, dc, rejoining is not None)
    cpu = spec.capacity.cpu if spec.capacity else 0.0
    memory = spec.capacity.memoryGiB if spec.capacity else 0.0
    gpus = tuple(sched.GpuGroup(g.model, g.count, g.memoryGiB) for g in spec.capacity.gpus) if spec.capacity else ()
    if agent is not None and agent.capacity.cpu_cores:
        cpu = float(agent.capacity.cpu_cores)
        memory = agent.capacity.memory_total_bytes / GIB
        gpus = measured_gpus(agent.capacity)
    elif agent is None and rejoining is not None:
        cpu, memory, gpus = _as_big_as(rejoining)
    energy = spec.energy
    budget = energy.powerBudgetWatts if energy else None
    if cordoned is not None or draining:
        cpu, memory, gpus = _as_big_as([v for _, v in cordoned or ()])
    return sched.Site(
        name=record.name,
        tier=sched.Tier(spec.tier),
        country=spec.location.country,
        region=spec.location.region or "",
        lat=spec.location.lat,
        lon=spec.location.lon,
        cpu=cpu,
        memory_gib=memory,
        gpus=gpus,
        carbon_g_per_kwh=energy.carbonGramsPerKWh if energy else DEFAULT_CARBON_G_PER_KWH,
        pue=energy.pue if energy else 1.0,
        power_budget_watts=budget,  # cordoned or not: what it holds must fit it
        healthy=healthy,
        draining=draining,
        labels=dict(record.labels),
        admits=Counter((d, v.name) for d, v in cordoned) if cordoned is not None else None,
        out_of_reach=out_of_reach,
        out_of_reach_since=dc.unreachable_at if out_of_reach and dc is not None else None,
        first_answer_awaited=out_of_reach and dc is not None and dc.waiting,
        owned_by=dc.owned_by if out_of_reach and dc is not None else None,
        runtimes=agent_runtimes(agent, sent) if agent is not None and spec.tier == "edge" else None,
    )


def _as_big_as(variants: Sequence[sched.Variant]) -> tuple[float, float, tuple[sched.GpuGroup, ...]]:
    """The capacity (CPU, memory GiB, GPUs) that holds exactly these replicas."""
    return (sum(v.cpu for v in variants), sum(v.memory_mib for v in variants) / 1024,
            tuple(sched.GpuGroup(v.gpu_model or "", v.gpus, v.gpu_memory_gib) for v in variants if v.gpus))


def to_variant(v: schema.Variant) -> sched.Variant:
    r = v.resources
    llm = llm_memory(v.llm) if v.llm is not None else None
    return sched.Variant(
        name=v.name,
        runtime=sched.Runtime(v.runtime),
        cpu=r.cpu,
        memory_mib=v.memory_mib(),
        gpus=llm.gpus if llm else r.gpus,
        gpu_memory_gib=llm.card_gib if llm else v.gpu_memory_gib(),
        throughput_rps=v.throughputRps,
        power_watts=v.powerWatts,
        gpu_model=v.llm.acceleratorType if v.llm is not None else None,
        llm_memory=llm,
    )


def llm_shape(llm: schema.LlmSpec) -> gpu_memory.LlmShape:
    a = llm.architecture
    return gpu_memory.LlmShape(
        weight_bytes=llm.weightBytes,
        layers=a.layers,
        kv_heads=a.kvHeads,
        head_dim=a.headDim,
        context_length=llm.contextLength,
        max_sequences=llm.maxConcurrentSequences,
        kv_bytes=llm.kvCacheDtypeBytes,
        sliding_window_layers=a.slidingWindowLayers,
        sliding_window_tokens=a.slidingWindowTokens,
        tensor_parallel_size=llm.tensorParallelSize,
        pipeline_parallel_size=llm.pipelineParallelSize,
        gpu_memory_utilization=llm.gpuMemoryUtilization,
        # a variant stored before the widths were asked for counts no adapter memory
        lora_slots=llm.lora.maxAdaptersPerReplica if llm.lora is not None and a.hiddenSize is not None else 0,
        lora_rank=llm.lora.maxRank if llm.lora is not None else 0,
        hidden_size=a.hiddenSize or 0,
        intermediate_size=a.intermediateSize or 0,
        attention_heads=a.attentionHeads or 0,
        lora_dtype_bytes=lora_dtype_bytes(llm),
    )


def lora_dtype_bytes(llm: schema.LlmSpec) -> int:
    """Bytes per element of vLLM's adapter slots: its ``lora_dtype`` (engine argument), which
    ``auto`` makes the model's dtype; vLLM's ``auto`` dtype is 16-bit."""
    lora_dtype = llm.engineArgs.get("lora_dtype", "auto")
    return 4 if (llm.dtype if lora_dtype in (None, "auto") else lora_dtype) == "float32" else 2


def llm_memory(llm: schema.LlmSpec) -> gpu_memory.GpuMemory:
    """The GPUs and GPU memory one replica of ``llm`` takes (see ``scheduler.gpu_memory``)."""
    return gpu_memory.replica_memory(llm_shape(llm))


def to_deployment(record: snap.DeploymentRecord, model: schema.ModelSpec, autoscaled: int | None = None) -> sched.Deployment:
    spec = record.spec
    p = spec.placement
    return sched.Deployment(
        name=record.name,
        model=spec.model,
        variants=tuple(to_variant(v) for v in model.variants),
        min_replicas=spec.replicas.min,
        max_replicas=spec.replicas.max,
        placement=sched.Placement(
            residency=residency.expand_residency(p.residency) if p.residency else None,
            tiers=frozenset(sched.Tier(t) for t in p.tiers),
            site_selector=dict(p.siteSelector),
            spread=sched.Spread(p.spread.by, p.spread.maxSkew) if p.spread else None,
        ),
        demand=tuple(sched.DemandPoint(rps=d.rps, region=d.region, lat=d.lat, lon=d.lon) for d in spec.demand),
        variant_by_tier=_variant_by_tier(spec, model),
        fallback=tuple(sched.Tier(t) for t in spec.routing.fallback),
        autoscaled_replicas=autoscaled,
    )


def _variant_by_tier(spec: schema.ModelDeploymentSpec, model: schema.ModelSpec) -> Mapping[sched.Tier, str]:
    if isinstance(spec.variant, dict):
        return {sched.Tier(t): v for t, v in spec.variant.items()}
    if isinstance(spec.variant, str):
        return {sched.Tier(t): spec.variant for t in spec.placement.tiers}
    return {}


def allowed_countries(spec: schema.ModelDeploymentSpec) -> frozenset[str]:
    return residency.expand_residency(spec.placement.residency) if spec.placement.residency else frozenset()


def current_replicas(rows: Iterable[snap.store_mod.PlacementRow]) -> tuple[sched.Replica, ...]:
    out: list[sched.Replica] = []
    for r in rows:
        out.extend(sched.Replica(r.deployment, r.site, r.variant) for _ in range(r.replicas))
    return tuple(out)
