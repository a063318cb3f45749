"""What edgeplane writes into a KubeRay ``RayService`` and reads back from it: pure
functions of data, no Kubernetes client (that is :mod:`orchestrator.adapters.kuberay`).

A site's Serve applications become one ``RayService``: ``serveConfigV2`` holds the same
applications the REST adapter would PUT, and ``rayClusterConfig`` is sized from what they
ask for (a CPU worker group, a GPU worker group when any replica wants a GPU, and for Ray
Serve LLM applications one group per accelerator type and tensor-parallel size, each pod
holding the GPUs of one replica on a node with that GPU model). Worker groups keep their
order, and an LLM group its pod while that still fits, across changes, since KubeRay
updates a cluster in place only when new groups are appended. The operator's application
statuses come back in the object's ``status``, read by :mod:`orchestrator.adapters.rayservice_status`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from orchestrator.adapters import pod_packing, serve_config
from orchestrator.adapters.serve_config import (
    DataCentreError,
    ServeAppSpec,
)

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
MANAGED_BY = "edgeplane"
SPEC_HASH_ANNOTATION = "edgeplane.io/spec-hash"
SITE_LABEL = "edgeplane.io/site"
#: The id of the control plane whose RayService this is (:class:`ownership.Ownership`): metadata
#: only, which KubeRay does not pass to the Ray cluster, so writing it restarts nothing.
OWNER_ANNOTATION = "edgeplane.io/owner"
SERVE_PORT = 8000


class ClusterShapeError(DataCentreError):
    """The replicas need more pods than the configured shape allows, or one asks for more
    than a pod offers (``apply()`` leaves such applications out first: ``misfits``,
    ``within_limit``)."""

    retryable = False


@dataclass(frozen=True)
class PodShape:
    cpu: float
    memory_gib: float
    gpus: int = 0


def _ray_version() -> str:
    return importlib.metadata.version("ray")


@dataclass(frozen=True)
class RayClusterShape:
    """How the site's Ray cluster is built. The image must have edgeplane installed for
    ``onnx`` applications (their import path is ``orchestrator.serving.onnx_app:build``)."""

    image: str = field(default_factory=lambda: f"rayproject/ray:{_ray_version()}-py311")
    ray_version: str = field(default_factory=_ray_version)
    head: PodShape = PodShape(cpu=2, memory_gib=8)
    cpu_worker: PodShape = PodShape(cpu=4, memory_gib=16)
    gpu_worker: PodShape = PodShape(cpu=8, memory_gib=32, gpus=1)
    #: Share of a pod's memory Ray hands to actors (the rest: object store, system).
    usable_memory_fraction: float = 0.6
    max_worker_pods: int = 64
    gpu_resource: str = "nvidia.com/gpu"
    #: Image of the pods that run Ray Serve LLM applications: Ray's LLM image has vLLM.
    llm_image: str = field(default_factory=lambda: f"rayproject/ray-llm:{_ray_version()}-py311-cu128")
    #: The least a pod of an LLM replica gets (loading weights takes host memory).
    llm_worker: PodShape = PodShape(cpu=8, memory_gib=64)
    #: Node selector per accelerator type; types not listed select on ACCELERATOR_LABEL.
    accelerator_node_selectors: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: dict(GPU_PRODUCT_SELECTORS)
    )


#: Label a platform team puts on GPU nodes whose model is not in GPU_PRODUCT_SELECTORS.
ACCELERATOR_LABEL = "edgeplane.io/accelerator-type"
#: Ray accelerator types as NVIDIA GPU feature discovery labels the nodes (nvidia.com/gpu.product).
GPU_PRODUCT_SELECTORS: Mapping[str, Mapping[str, str]] = {
    "H100": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "H200": {"nvidia.com/gpu.product": "NVIDIA-H200"},
    "A100-80G": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
    "A100-40G": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
    "L40S": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
    "L4": {"nvidia.com/gpu.product": "NVIDIA-L4"},
    "A10G": {"nvidia.com/gpu.product": "NVIDIA-A10G"},
}


#: The longest RayService name KubeRay (v1.4 on) reconciles: its RayCluster takes the name
#: plus 6 characters and its Serve service that plus "-serve-svc", within 63. A longer one
#: is only refused with an event, and its cluster never made.
MAX_RAYSERVICE_NAME = 47
_NAME_PREFIX = "edgeplane-"


def rayservice_name(site: str) -> str:
    """``edgeplane-<site>``; for a site name too long for that, its first characters and a
    digest of the whole name, so that two long names that begin alike never share one."""
    name = _NAME_PREFIX + site
    if len(name) <= MAX_RAYSERVICE_NAME:
        return name
    digest = hashlib.sha256(site.encode()).hexdigest()[:10]
    keep = MAX_RAYSERVICE_NAME - len(_NAME_PREFIX) - len(digest) - 1
    return f"{_NAME_PREFIX}{site[:keep].rstrip('-')}-{digest}"


def earlier_rayservice_name(site: str) -> str:
    """The name versions before the limit above gave a site's RayService: cut at 63."""
    return (_NAME_PREFIX + site)[:63].rstrip("-")


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _container(name: str, shape: RayClusterShape, pod: PodShape, image: str | None = None) -> dict[str, Any]:
    resources = {"cpu": _quantity(pod.cpu), "memory": f"{_quantity(pod.memory_gib)}Gi"}
    if pod.gpus:
        resources[shape.gpu_resource] = str(pod.gpus)
    return {
        "name": name,
        "image": image or shape.image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }


def _worker_pod(app: ServeAppSpec, shape: RayClusterShape) -> tuple[str, PodShape] | None:
    """The kind and shape of worker pod that runs ``app``'s replicas; None for a Ray Serve
    LLM application, whose group's pods are sized from its applications."""
    if app.llm is not None:
        return None
    return ("GPU", shape.gpu_worker) if app.gpus > 0 else ("CPU", shape.cpu_worker)


def _misfit(app: ServeAppSpec, kind: str, pod: PodShape, shape: RayClusterShape) -> str:
    """Why a replica of ``app`` fits no ``kind`` worker pod of shape ``pod``; "" when it fits."""
    usable_mib = pod.memory_gib * 1024 * shape.usable_memory_fraction
    if app.cpu > pod.cpu or app.memory_mib > usable_mib or app.gpus > pod.gpus:
        gpus = f" / {_quantity(app.gpus)} GPU" if app.gpus else ""
        offers = f" / {pod.gpus} GPU" if pod.gpus else ""
        return (f"a replica asks for {_quantity(app.cpu)} CPU / {app.memory_mib} MiB{gpus} but a {kind} worker "
                f"pod offers {_quantity(pod.cpu)} CPU / {usable_mib:.0f} MiB usable{offers}")
    return ""


def misfits(apps: Sequence[ServeAppSpec], shape: RayClusterShape) -> dict[str, str]:
    """The applications whose replicas fit no worker pod of ``shape``, by name: why. The
    scheduler places by a site's declared capacity, which knows nothing of pod shapes, so
    such an application is left out of the RayService (and reported as failed), or kept as
    it runs (:func:`within_limit`), rather than failing the site's others with it."""
    out = {}
    for app in apps:
        if (worker := _worker_pod(app, shape)) is not None and (why := _misfit(app, *worker, shape)):
            out[app.name] = why
    return out


def _packed(apps: Sequence[ServeAppSpec], pod: PodShape, shape: RayClusterShape) -> int | None:
    """The ``pod``s that hold ``apps``' replicas; None past ``shape.max_worker_pods``."""
    usable_mib = pod.memory_gib * 1024 * shape.usable_memory_fraction
    return pod_packing.pods_needed([(pod_packing.Resources(a.cpu, a.memory_mib, a.gpus), a.num_replicas) for a in apps],
                                   pod_packing.Resources(pod.cpu, usable_mib, pod.gpus), shape.max_worker_pods)


def _llm_pods(app: ServeAppSpec) -> int:
    """The pods an LLM application's group gives it: one per replica, its autoscaling maximum when Serve scales it."""
    assert app.llm is not None
    return app.llm.autoscaling[1] if app.llm.autoscaling else app.num_replicas


def _llm_by_group(apps: Sequence[ServeAppSpec]) -> dict[tuple[str, int], list[ServeAppSpec]]:
    """The LLM applications of each worker group, by (accelerator type, "" for any; GPUs per replica)."""
    by_group: dict[tuple[str, int], list[ServeAppSpec]] = {}
    for a in apps:
        if a.llm is not None:
            by_group.setdefault((a.llm.accelerator_type or "", a.llm.gpus), []).append(a)
    return by_group


def _past_limit(apps: Sequence[ServeAppSpec], shape: RayClusterShape) -> str:
    """The worker pods ``apps`` would take past ``shape.max_worker_pods`` ("" none): each
    group has the limit of its own."""
    plain = [a for a in apps if a.llm is None]
    for kind, pod, mine in (("CPU", shape.cpu_worker, [a for a in plain if a.gpus <= 0]),
                            ("GPU", shape.gpu_worker, [a for a in plain if a.gpus > 0])):
        if _packed(mine, pod, shape) is None:
            return f"{kind} worker pods"
    return next((f"{accelerator or 'GPU'} x{gpus} LLM worker pods" for (accelerator, gpus), mine in sorted(_llm_by_group(apps).items())
                 if sum(map(_llm_pods, mine)) > shape.max_worker_pods), "")


def _refused(chosen: Iterable[ServeAppSpec], app: ServeAppSpec, shape: RayClusterShape) -> str:
    """Why ``app`` cannot join the applications ``chosen`` on the RayService ("" it can)."""
    if (worker := _worker_pod(app, shape)) is not None and (why := _misfit(app, *worker, shape)):
        return why
    if past := _past_limit([*chosen, app], shape):
        return f"its replicas would take the RayService's {past} past the limit of {shape.max_worker_pods} (max_worker_pods)"
    return ""


def within_limit(apps: Sequence[ServeAppSpec], shape: RayClusterShape,
                 running: Mapping[str, ServeAppSpec]) -> tuple[list[ServeAppSpec], dict[str, str]]:
    """The applications to apply so that every replica fits a worker pod and no worker group
    passes ``shape.max_worker_pods``, and those applied otherwise than asked, by name: why.
    Past the limit the RayService is refused whole, which would hold up every change on the
    site (a deletion, a scale-down, a drain) for the room one application asks.

    ``running`` is each application the RayService runs, as it runs. Left out, such an
    application would be removed from the cluster, its model gone from the site for asking
    more; so each first keeps its room as it runs (at no more replicas than asked), then each
    by name takes what it asks where there is room, else its new config at the count it runs,
    else stays as it runs. One application's growth never takes another's room. New ones
    come last, by name, and one there is no room for is left out."""
    if not misfits(apps, shape) and not _past_limit(apps, shape):
        return list(apps), {}
    asked = {a.name: a for a in apps}
    chosen: dict[str, ServeAppSpec] = {}
    why: dict[str, str] = {}
    for name in sorted(set(asked) & set(running)):  # only a shape made smaller refuses one of these
        floor = dataclasses.replace(running[name], num_replicas=min(asked[name].num_replicas, running[name].num_replicas))
        if not _refused(chosen.values(), floor, shape):
            chosen[name] = floor
    for name in sorted(chosen):
        others, app, runs = [a for n, a in chosen.items() if n != name], asked[name], running[name].num_replicas
        held = dataclasses.replace(app, num_replicas=runs)
        if not (refused := _refused(others, app, shape)):
            chosen[name] = app
        elif runs < app.num_replicas and not _refused(others, held, shape):
            chosen[name] = held
            why[name] = f"kept at the {runs} replica(s) it runs: {app.num_replicas} {refused.removeprefix('its replicas ')}"
        else:
            why[name] = f"kept as it runs, its update not applied: {refused}"
    for app in sorted((a for a in apps if a.name not in chosen), key=lambda a: a.name):
        if refused := _refused(chosen.values(), app, shape):
            why[app.name] = refused
        else:
            chosen[app.name] = app
    return [chosen[a.name] for a in apps if a.name in chosen], why


def _pods_for(apps: Sequence[ServeAppSpec], pod: PodShape, shape: RayClusterShape) -> int:
    for app in apps:
        kind = (_worker_pod(app, shape) or ("", pod))[0]
        if why := _misfit(app, kind, pod, shape):
            raise ClusterShapeError(why)
    needed = _packed(apps, pod, shape)
    if needed is None:
        raise ClusterShapeError(
            f"the applications need more worker pods than the limit of {shape.max_worker_pods}"
        )
    return needed


def _worker_group(
    name: str, replicas: int, pod: PodShape, shape: RayClusterShape
) -> dict[str, Any]:
    return {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {},
        "template": {"spec": {"containers": [_container("ray-worker", shape, pod)]}},
    }


def _running_pods(running: Sequence[Any], shape: RayClusterShape) -> dict[str, PodShape]:
    """The pod of each running worker group, by group name, read as :func:`_container`
    writes it; a group written otherwise (a hand edit) is left out, and sized anew."""
    out: dict[str, PodShape] = {}
    for group in running:
        try:
            requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
            memory = str(requests["memory"])
            if memory.endswith("Gi"):
                out[str(group["groupName"])] = PodShape(cpu=float(requests["cpu"]), memory_gib=float(memory[:-2]),
                                                        gpus=int(requests.get(shape.gpu_resource, 0)))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            continue
    return out


def _llm_groups(apps: Sequence[ServeAppSpec], shape: RayClusterShape, running: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """One worker group per (accelerator type, GPUs per replica) of the LLM apps: a pod
    per replica (its autoscaling maximum when Serve scales it), holding that replica's GPUs,
    on nodes of that GPU model, as big as its largest application asks. A group the cluster
    runs keeps its pod while that still holds every application in it: shrinking it (its
    largest application removed) would change the group's template, and KubeRay would build
    a whole new cluster for that (see :func:`arrange_worker_groups`)."""
    kept = _running_pods(running, shape)
    by_kind = _llm_by_group(apps)
    names = _llm_group_names(list(by_kind))
    groups = []
    for (accelerator, gpus), mine in sorted(by_kind.items()):
        pods = sum(map(_llm_pods, mine))
        if pods > shape.max_worker_pods:
            raise ClusterShapeError(f"the LLM applications need {pods} GPU pods, above the limit of {shape.max_worker_pods}")
        memory_gib = max([shape.llm_worker.memory_gib]
                         + [a.memory_mib / 1024 / shape.usable_memory_fraction for a in mine])
        pod = PodShape(cpu=max([shape.llm_worker.cpu] + [a.cpu for a in mine]), memory_gib=math.ceil(memory_gib), gpus=gpus)
        if (was := kept.get(names[accelerator, gpus])) is not None and (
                was.gpus == pod.gpus and was.cpu >= pod.cpu and was.memory_gib >= pod.memory_gib):
            pod = was
        group = _worker_group(names[accelerator, gpus], pods, pod, shape)
        template = group["template"]["spec"]
        template["containers"] = [_container("ray-worker", shape, pod, image=shape.llm_image)]
        template["tolerations"] = [{"key": shape.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
        if accelerator:
            selector = shape.accelerator_node_selectors.get(accelerator) or {ACCELERATOR_LABEL: accelerator}
            template["nodeSelector"] = dict(selector)
        groups.append(group)
    return groups


def _llm_group_names(kinds: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """``llm-<accelerator>-x<GPUs>`` per (accelerator type, GPUs per replica), unique
    (the CRD keys worker groups by name) and short enough for the label KubeRay puts on each
    pod (63 characters): a type that spells the same once lowered and stripped of ``_``/``.``,
    or a long one, gets a digest of its own spelling."""
    slugs = {kind: "".join(c if c.isalnum() else "-" for c in kind[0].lower()) or "gpu" for kind in kinds}
    names = {kind: f"llm-{slug}-x{kind[1]}" for kind, slug in slugs.items()}
    taken = list(names.values())
    for kind, name in names.items():
        if taken.count(name) > 1 or len(slugs[kind]) > 32:
            digest = hashlib.sha256(kind[0].encode()).hexdigest()[:8]
            names[kind] = f"llm-{slugs[kind][:32]}-{digest}-x{kind[1]}"
    return names


def render_serve_config(
    apps: Sequence[ServeAppSpec], learnt: Mapping[str, str] | None = None
) -> dict[str, Any]:
    return {
        "applications": [
            serve_config.render_application(a, (learnt or {}).get(a.name)) for a in apps
        ]
    }


def owner_of(obj: Mapping[str, Any]) -> str | None:
    """The control plane a RayService is marked as owned by; None if unmarked (an earlier release's)."""
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(OWNER_ANNOTATION)


def spec_hash(obj: Mapping[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)


def arrange_worker_groups(wanted: Sequence[dict[str, Any]], running: Sequence[Any]) -> list[dict[str, Any]]:
    """The worker groups to send, given the RayService's groups as they are (``running``).

    KubeRay updates the running cluster in place only when its worker groups are unchanged
    but for their replica counts and new ones come after them; any other change (a group
    inserted, removed or reordered) makes it build a whole new cluster beside the old one:
    every replica of the site restarts, and every pod, GPUs included, is needed twice
    meanwhile. So the running groups keep their places, a group no longer needed stays at 0
    pods (it costs nothing), and a new group is appended.
    """
    by_name = {g["groupName"]: g for g in wanted}
    out: list[dict[str, Any]] = []
    for group in running:
        name = group.get("groupName") if isinstance(group, Mapping) else None
        if not isinstance(name, str) or any(g["groupName"] == name for g in out):
            continue  # not a worker group: the API server would not have taken it
        if name in by_name:
            out.append(by_name.pop(name))
        else:
            out.append({**copy.deepcopy(dict(group)), "replicas": 0, "minReplicas": 0, "maxReplicas": 0})
    return out + [g for g in wanted if g["groupName"] in by_name]


def render_rayservice(
    site: str,
    namespace: str,
    apps: Sequence[ServeAppSpec],
    shape: RayClusterShape,
    learnt: Mapping[str, str] | None = None,
    running_groups: Sequence[Any] = (),
) -> dict[str, Any]:
    """The full ``RayService`` object for ``apps`` on ``site`` (pure; validated by tests
    against the KubeRay CRD schema); ``running_groups`` are the worker groups of the
    RayService as it is, whose order is kept (:func:`arrange_worker_groups`)."""
    llm_apps = [a for a in apps if a.llm is not None]
    gpu_apps = [a for a in apps if a.gpus > 0 and a.llm is None]
    cpu_apps = [a for a in apps if a.gpus <= 0 and a.llm is None]
    groups = [
        _worker_group("cpu", _pods_for(cpu_apps, shape.cpu_worker, shape), shape.cpu_worker, shape)
    ]
    if gpu_apps:
        groups.append(
            _worker_group(
                "gpu", _pods_for(gpu_apps, shape.gpu_worker, shape), shape.gpu_worker, shape
            )
        )
    groups += _llm_groups(llm_apps, shape, running_groups)
    spec = {
        "serveConfigV2": yaml.safe_dump(render_serve_config(apps, learnt), sort_keys=True),
        "rayClusterConfig": {
            "rayVersion": shape.ray_version,
            "headGroupSpec": {
                # The head runs the Serve controller and proxy, no replicas.
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                "template": {"spec": {"containers": [_container("ray-head", shape, shape.head)]}},
            },
            "workerGroupSpecs": arrange_worker_groups(groups, running_groups),
        },
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayService",
        "metadata": {
            "name": rayservice_name(site),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, SITE_LABEL: site},
            "annotations": {SPEC_HASH_ANNOTATION: digest},
        },
        "spec": spec,
    }


def configured_applications(obj: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], str]:
    """The applications a RayService's ``serveConfigV2`` configures, and what is wrong with
    it when it is not a Serve config (a hand edit, another tool): then none, so that
    observing it reports drift for the next apply to repair rather than failing."""
    text = (obj.get("spec") or {}).get("serveConfigV2") or ""
    try:
        configured = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        return [], f"serveConfigV2 is not YAML ({str(exc).splitlines()[0]})"
    if not isinstance(configured, Mapping):
        return [], "serveConfigV2 is not a mapping"
    apps = configured.get("applications") or []
    if not isinstance(apps, list):
        return [], "serveConfigV2 applications is not a list"
    if not all(isinstance(a, Mapping) and isinstance(a.get("name"), str) for a in apps):
        return [], "serveConfigV2 has an application that is not a mapping with a name"
    return apps, ""
