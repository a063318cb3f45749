"""A data centre's Serve applications, as a reconcile pass renders them from its placement.

Each placed variant of a deployment on a data-centre site is one Serve application: its
name (which says which site owns it on a Ray cluster several sites share), its route
prefix and its spec, sized by the placement's replica count. Apart from
:mod:`orchestrator.reconciler.planning`, which calls :func:`serve_apps` once a pass and
reads the names for statuses; pure, as planning is. :func:`serve_update` sets what it
renders for a variant before and after a change side by side, so that a plan says which
change restarts an application's replicas by what Ray Serve would be sent, not by a list
of fields kept apart from the rendering.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.adapters import serve_config
from orchestrator.manifests import schema
from orchestrator.reconciler import snapshot as snap
from orchestrator.store import sqlite as store_mod


# Serve application names: ``ep-<deployment>.<variant>.<site>``, one application per
# variant of a deployment on a site (a site may run two variants of one deployment, and
# Serve wants each application's name and route prefix once). Site, deployment and variant
# names are DNS labels, which hold no ``.`` and no ``_``: the last part says which site owns
# an application whatever ``-`` the names contain (several sites may share one Ray
# cluster), and where the name would pass 63 characters, parts are shortened in turn to a
# prefix, ``_`` and a digest of the whole part, which no full name can spell.
_NAME_CHARS = 63
_PART_CHARS = (24, 14, 20)  # deployment, variant, site: 3 + 24 + 1 + 14 + 1 + 20 = 63


def _part(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit - 9]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def app_name(site: str, deployment: str, variant: str) -> str:
    """Serve application of ``variant`` of ``deployment`` on ``site`` (at most 63 characters)."""
    parts = [deployment, variant, site]
    for i, limit in enumerate(_PART_CHARS):
        if len("ep-" + ".".join(parts)) <= _NAME_CHARS:
            break
        parts[i] = _part(parts[i], limit)
    return "ep-" + ".".join(parts)


def owns_app(site: str) -> Callable[[str], bool]:
    """Which applications on a (possibly shared) Ray cluster belong to ``site``: those
    ``app_name`` gives it, and those named ``ep-<deployment>--<site>`` by earlier versions,
    which the site's next apply replaces. An earlier name cannot say which of two sites
    named ``a`` and ``b--a`` owns ``ep-d--b--a``: both claim it, both replace it."""
    parts = {site, _part(site, _PART_CHARS[2])}
    legacy = f"--{site if len(site) <= 28 else hashlib.sha256(site.encode()).hexdigest()[:12]}"  # as they shortened it

    def owns(name: str) -> bool:
        if not name.startswith("ep-"):
            return False
        if "." in name:
            return name.count(".") == 2 and name.rsplit(".", 1)[1] in parts
        return name.endswith(legacy)
    return owns


def route_prefix(site: str, deployment: str, variant: str) -> str:
    return f"/ep/{site}/{deployment}/{variant}"


def variant(s: snap.Snapshot, deployment: snap.DeploymentRecord, name: str) -> schema.Variant | None:
    """``deployment``'s Model's variant ``name``; None where the Model or the variant is gone."""
    model = s.models.get(deployment.spec.model)
    return next((v for v in model.variants if v.name == name), None) if model else None


@dataclass(frozen=True)
class ServeApps:
    """What a pass gives each data-centre site: its applications, by site; and, by
    deployment, why each of its applications that could not be rendered was not (one line)."""

    by_site: dict[str, tuple[serve_config.ServeAppSpec, ...]]
    unapplied: dict[str, str]


def serve_apps(s: snap.Snapshot, rows: Iterable[store_mod.PlacementRow]) -> ServeApps:
    """The applications of ``rows`` on data-centre sites. One the Serve adapter refuses (an
    import path an earlier version stored, which apply refuses now) is left out, or kept as
    last applied where this leader applied it, and its deployment is said to fail: it fails
    alone, where it failed the pass, and with it every deployment of the fleet, at every pass."""
    deployments = s.deployment_by_name
    dcs = [r.name for r in s.sites if r.spec.tier == "datacenter"]
    out: dict[str, list[serve_config.ServeAppSpec]] = {site: [] for site in dcs}
    unapplied: dict[str, list[str]] = {}
    for row in rows:
        if row.site not in out or row.deployment not in deployments:
            continue
        d = deployments[row.deployment]
        v = variant(s, d, row.variant)
        if v is None:
            continue
        name = app_name(row.site, d.name, v.name)
        try:
            spec = app_spec(s, row, d, v, name)
        except ValueError as exc:  # this deployment's values: its own failure
            why = "; ".join(exc.problems) if isinstance(exc, serve_config.InvalidServeApp) else " ".join(str(exc).split())
            spec = next((a for a in s.applied_apps.get(row.site, ()) if a.name == name), None)
            unapplied.setdefault(d.name, []).append(f"{row.site}: not applied: {why}" + ("; it runs as it was" if spec else ""))
        if spec is not None:
            out[row.site].append(spec)
    return ServeApps({site: tuple(sorted(apps, key=lambda a: a.name)) for site, apps in out.items()},
                     {name: "; ".join(whys) for name, whys in unapplied.items()})


def app_spec(s: snap.Snapshot, row: store_mod.PlacementRow, d: snap.DeploymentRecord, v: schema.Variant,
             name: str) -> serve_config.ServeAppSpec | None:
    """The application of ``row`` (variant ``v`` of ``d``), named ``name``; None while an
    ONNX variant's artifact has no URL to send. :class:`~serve_config.InvalidServeApp`
    where the adapter refuses what the variant says."""
    common: dict[str, Any] = dict(
        name=name, route_prefix=route_prefix(row.site, d.name, v.name), model_name=d.spec.model, runtime=v.runtime,
        num_replicas=row.replicas, cpu=v.resources.cpu, memory_mib=v.memory_mib(), gpus=float(v.resources.gpus),
    )
    if v.llm is not None:
        llm = llm_app(v.llm, d.spec.model)
        common["gpus"] = float(llm.gpus)
        return serve_config.ServeAppSpec(**common, llm=llm)
    if v.runtime in ("onnx", "onnx-genai"):
        ref = s.artifacts.get((d.spec.model, v.name))
        if ref is None or ref.url is None or v.artifact is None:
            return None
        if v.generative is not None:
            g = v.generative
            common["args"] = {"max_concurrent_sequences": g.maxConcurrentSequences, "max_queued": g.maxQueued}
        elif v.inputs or v.outputs:  # what the replica checks the file against; absent: nothing (as it was)
            common["args"] = {kind: [t.model_dump() for t in tensors] for kind, tensors in (("inputs", v.inputs), ("outputs", v.outputs))
                              if tensors}
        return serve_config.ServeAppSpec(**common, artifact_uri=ref.url, sha256=v.artifact.sha256, artifact_hosts=ref.hosts)
    return serve_config.ServeAppSpec(**common, import_path=v.importPath, args=dict(v.args),
                                     deployment=sized_deployment(s, row.site, name))


def sized_deployment(s: snap.Snapshot, site: str, app: str) -> str | None:
    """The deployment a ``ray-serve`` application's replica count goes to: the ingress its
    cluster reports, else the one the last apply named (a pass that could not see the
    application must not send it unsized, back to its own default count); None until the
    cluster has reported it, when the application runs with its own defaults."""
    dc = s.datacentres.get(site)
    status = dc.apps.get(app) if dc is not None else None
    if status is not None and status.ingress:
        return status.ingress
    return next((a.deployment for a in s.applied_apps.get(site, ()) if a.name == app), None)


def serve_update(current: snap.Snapshot, future: snap.Snapshot, site: str, deployment: str, name: str) -> list[str]:
    """The fields of variant ``name`` of ``deployment`` whose change from ``current`` to
    ``future`` makes Ray Serve restart its application's replicas on data-centre ``site``
    (``importPath``, ``args``, ``resources``, ``llm.engineArgs``...); empty when none does.

    The application is rendered before and after as the adapters send it, with the same
    replica count: a new count is a lightweight update in Ray Serve's terms (the replicas
    running keep running), which a plan shows as a change of its own; and without the
    model file, whose change a plan shows as a version roll. A field is named when its new
    value alone changes what Ray Serve is sent (for ``llm``, each of its own fields), so
    what only sizes or places replicas (``throughputRps``, ``llm.weightBytes``) names
    nothing; ``model`` where the deployment naming another Model is what changes it."""
    tier = current.site_by_name.get(site)
    before_d, after_d = current.deployment_by_name.get(deployment), future.deployment_by_name.get(deployment)
    if tier is None or tier.spec.tier != "datacenter" or before_d is None or after_d is None:
        return []
    before, after = variant(current, before_d, name), variant(future, after_d, name)
    if before is None or after is None:
        return []
    sent = _sent(current, site, before_d, before)
    if sent == _sent(current, site, after_d, after):
        return []
    fields = [f for f in type(before).model_fields if f not in ("name", "artifact") and getattr(before, f) != getattr(after, f)]
    changed = []
    for f in fields:
        old, new = getattr(before, f), getattr(after, f)
        if f == "llm" and old is not None and new is not None:
            changed += [f"llm.{g}" for g in type(old).model_fields if getattr(old, g) != getattr(new, g) and _sent(
                current, site, before_d, before.model_copy(update={"llm": old.model_copy(update={g: getattr(new, g)})})) != sent]
        elif _sent(current, site, before_d, before.model_copy(update={f: new})) != sent:
            changed.append(f)
    # nothing alone, all together: the deployment names another Model, or the fields only change it together
    return changed or (["model"] if before_d.spec.model != after_d.spec.model else fields)


def _sent(s: snap.Snapshot, site: str, d: snap.DeploymentRecord, v: schema.Variant) -> dict[str, Any] | None:
    """What Ray Serve is sent for one replica of ``v`` on ``site``, less its model file;
    None where nothing can be (the adapter refuses it, or an ONNX file has no URL yet)."""
    try:
        spec = app_spec(s, store_mod.PlacementRow(d.name, site, v.name, 1), d, v, app_name(site, d.name, v.name))
    except ValueError:
        return None
    if spec is None:
        return None
    app = serve_config.render_application(spec)
    if spec.runtime in ("onnx", "onnx-genai"):
        app["args"] = {k: x for k, x in app["args"].items() if k not in ("artifact_uri", "sha256", "artifact_hosts")}
    return app


def llm_app(llm: schema.LlmSpec, model: str) -> serve_config.LlmApp:
    """The Ray Serve LLM application of a vllm variant: its fields as vLLM engine arguments
    (``engineArgs`` last, which the manifest keeps from repeating these)."""
    kwargs: dict[str, Any] = {"max_model_len": llm.contextLength, "max_num_seqs": llm.maxConcurrentSequences,
                              "dtype": llm.dtype, "gpu_memory_utilization": llm.gpuMemoryUtilization}
    if llm.quantization:
        kwargs["quantization"] = llm.quantization
    if llm.kvCacheDtypeBytes == 1:
        kwargs["kv_cache_dtype"] = "fp8"
    lora = None if llm.lora is None else serve_config.LoraAdapters(
        path=llm.lora.adaptersFrom, max_per_replica=llm.lora.maxAdaptersPerReplica, max_rank=llm.lora.maxRank,
        download_timeout_s=llm.lora.downloadTimeoutSeconds, download_attempts=llm.lora.downloadAttempts)
    return serve_config.LlmApp(model_id=llm.servedModelName or model, source=llm.source,
                               engine_kwargs={**kwargs, **llm.engineArgs}, tensor_parallel_size=llm.tensorParallelSize,
                               pipeline_parallel_size=llm.pipelineParallelSize, accelerator_type=llm.acceleratorType, lora=lora)
