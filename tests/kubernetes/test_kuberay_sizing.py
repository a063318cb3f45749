"""The RayService's worker groups for any set of applications: every replica has a pod with
room for it, group names are unique and fit a Kubernetes label, and the object validates
against the real CRD; or the set is refused with one line."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orchestrator.adapters import rayservice, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec

SHA = "c" * 64
SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0",
                                llm_image="registry.example/ray-llm:2.60.0-py311-cu128")
ACCELERATORS = ["H100", "h100", "A100-80G", "A100_80G", "a100.80g", "L4", "X" * 64, "Y" * 63 + "z"]


def onnx(i: int, replicas: int, cpu: float, memory_mib: int, gpus: float) -> ServeAppSpec:
    return ServeAppSpec(name=f"ep-m{i}", route_prefix=f"/ep/m{i}", model_name=f"m{i}", runtime="onnx", num_replicas=replicas,
                        cpu=cpu, memory_mib=memory_mib, gpus=gpus, artifact_uri="https://models.example/m.onnx", sha256=SHA)


def llm(i: int, replicas: int, accelerator: str, tp: int) -> ServeAppSpec:
    config = serve_config.LlmApp(model_id=f"l{i}", source=f"/mnt/models/l{i}", tensor_parallel_size=tp, accelerator_type=accelerator)
    return ServeAppSpec(name=f"ep-l{i}", route_prefix=f"/ep/l{i}", model_name=f"l{i}", runtime="vllm", num_replicas=replicas,
                        cpu=8.0, memory_mib=64 * 1024, gpus=float(tp), llm=config)


@st.composite
def app_sets(draw: st.DrawFn) -> list[ServeAppSpec]:
    apps = [onnx(i, draw(st.integers(0, 24)), draw(st.sampled_from([0, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 3, 4, 5])),
                 draw(st.sampled_from([0, 256, 1024, 3000, 5000, 9000, 12000])), draw(st.sampled_from([0, 0, 0.25, 0.5, 0.6, 1, 2])))
            for i in range(draw(st.integers(0, 5)))]
    apps += [llm(i, draw(st.integers(0, 4)), draw(st.sampled_from(ACCELERATORS)), draw(st.sampled_from([1, 2, 8])))
             for i in range(draw(st.integers(0, 3)))]
    return apps


def first_fit_pods(apps: list[ServeAppSpec], pod: rayservice.PodShape) -> int:
    """Replica by replica, largest share of a pod first, each into the first pod with room."""
    capacity = (pod.cpu, pod.memory_gib * 1024 * SHAPE.usable_memory_fraction, pod.gpus)
    replicas = [(a.cpu, a.memory_mib, a.gpus) for a in apps for _ in range(a.num_replicas) if a.cpu or a.memory_mib or a.gpus]
    replicas.sort(key=lambda r: max(n / c for n, c in zip(r, capacity) if c), reverse=True)
    pods: list[list[float]] = []
    for r in replicas:
        room = next((p for p in pods if all(n <= left + 1e-9 for n, left in zip(r, p))), None)
        if room is None:
            room = list(capacity)
            pods.append(room)
        room[:] = [left - n for left, n in zip(room, r)]
    return len(pods)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(app_sets(), st.integers(2, 64))
def test_every_replica_has_room_and_the_object_is_one_the_api_server_takes(rayservice_validator: Any,
                                                                           apps: list[ServeAppSpec], limit: int) -> None:
    shape = dataclasses.replace(SHAPE, max_worker_pods=limit)
    try:
        obj = rayservice.render_rayservice("paris-dc", "edge-dc", apps, shape)
    except rayservice.ClusterShapeError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    rayservice_validator.validate(obj)
    groups = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), names  # the CRD keys the list by groupName
    assert all(len(name) <= 63 for name in names), names  # KubeRay labels each pod with it
    sized = {g["groupName"]: g["replicas"] for g in groups}
    cpu_apps = [a for a in apps if a.llm is None and a.gpus <= 0]
    gpu_apps = [a for a in apps if a.llm is None and a.gpus > 0]
    assert sized["cpu"] == first_fit_pods(cpu_apps, SHAPE.cpu_worker) <= limit
    assert sized.get("gpu", 0) == first_fit_pods(gpu_apps, SHAPE.gpu_worker) <= limit
    for pods, group_apps, pod in ((sized["cpu"], cpu_apps, SHAPE.cpu_worker), (sized.get("gpu", 0), gpu_apps, SHAPE.gpu_worker)):
        demand = serve_config.total_demand(group_apps)
        assert pods >= math.ceil(demand.cpu / pod.cpu - 1e-9)  # never fewer than the sums need
    llm_replicas = sum(a.num_replicas for a in apps if a.llm is not None)
    assert sum(n for name, n in sized.items() if name.startswith("llm-")) == llm_replicas


@pytest.mark.parametrize(
    ("replicas", "cpu", "memory_mib", "pods"),
    [
        (3, 2.5, 0, 3),  # two replicas of 2.5 CPUs do not share a 4-CPU pod: the sum (7.5 / 4) said 2
        (3, 3, 0, 3),
        (4, 2, 0, 2),
        (5, 0.8, 0, 1),  # 4.0 CPUs in one pod, summed as 0.8s
        (3, 1, 5000, 3),  # 9,830 MiB usable: one 5,000 MiB replica a pod
    ],
)
def test_replicas_that_do_not_fill_a_pod_evenly_get_a_pod_each(replicas: int, cpu: float, memory_mib: int, pods: int) -> None:
    obj = rayservice.render_rayservice("s", "ns", [onnx(0, replicas, cpu, memory_mib, 0)], SHAPE)
    assert obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == pods


def test_fractional_gpus_that_do_not_share_a_gpu_get_a_pod_each() -> None:
    obj = rayservice.render_rayservice("s", "ns", [onnx(0, 3, 1, 0, 0.6)], SHAPE)
    assert {g["groupName"]: g["replicas"] for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]} == {"cpu": 0, "gpu": 3}


def test_accelerator_types_that_slug_alike_get_groups_of_their_own() -> None:
    apps = [llm(0, 1, "A100-80G", 1), llm(1, 1, "A100_80G", 1), llm(2, 1, "H100", 1), llm(3, 1, "Z" * 64, 8)]
    groups = rayservice.render_rayservice("s", "ns", apps, SHAPE)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    names = sorted(g["groupName"] for g in groups)
    assert names[0] == "cpu" and "llm-h100-x1" in names  # a name no other type shares stays readable
    llm_names = [n for n in names if n.startswith("llm-a100-80g-")]
    assert len(llm_names) == 2 and all(n.endswith("-x1") for n in llm_names)
    assert all(len(n) <= 63 for n in names)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(app_sets(), st.integers(1, 8))
def test_the_applications_kept_within_the_pod_limit_always_make_a_rayservice(apps: list[ServeAppSpec], limit: int) -> None:
    """Whatever is asked, what is applied is never refused whole: every application is
    applied or said to be left out, and a set within the limit is applied as asked."""
    shape = dataclasses.replace(SHAPE, max_worker_pods=limit)
    kept, why = rayservice.within_limit(apps, shape, {})
    rayservice.render_rayservice("paris-dc", "edge-dc", kept, shape)  # refuses nothing
    assert {a.name for a in kept} | set(why) == {a.name for a in apps}
    assert set(rayservice.misfits(apps, shape)) <= set(why) - {a.name for a in kept}
    try:
        rayservice.render_rayservice("paris-dc", "edge-dc", apps, shape)
    except rayservice.ClusterShapeError:
        assert why
    else:
        assert (kept, why) == (apps, {})


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(app_sets(), st.data(), st.integers(1, 8))
def test_an_application_the_rayservice_runs_is_never_left_out(apps: list[ServeAppSpec], data: st.DataObject, limit: int) -> None:
    """Left out, an application the RayService runs would be removed from the cluster: each
    keeps its room whatever the others ask, its update taken where there is room, else it
    stays at the count it runs, else as it runs; and one asked at no more replicas than it
    runs, and otherwise unchanged, is applied as asked."""
    shape = dataclasses.replace(SHAPE, max_worker_pods=limit)
    running = {a.name: dataclasses.replace(a, num_replicas=data.draw(st.integers(0, 8)),
                                           cpu=data.draw(st.sampled_from([a.cpu, a.cpu, 0.5, 1, 4])))  # as before an update
               for a in apps if data.draw(st.booleans())}
    try:
        rayservice.render_rayservice("paris-dc", "edge-dc", list(running.values()), shape)
    except rayservice.ClusterShapeError:
        assume(False)  # what runs fits the shape: it was applied to it
    kept, why = rayservice.within_limit(apps, shape, running)
    rayservice.render_rayservice("paris-dc", "edge-dc", kept, shape)  # refuses nothing
    applied = {a.name: a for a in kept}
    for a in apps:
        if (runs := running.get(a.name)) is None:
            continue
        n = runs.num_replicas
        assert applied.get(a.name) in (a, dataclasses.replace(a, num_replicas=n),
                                       dataclasses.replace(runs, num_replicas=min(n, a.num_replicas))), (a, runs, why)
        if runs == dataclasses.replace(a, num_replicas=n) and a.num_replicas <= n:
            assert (applied[a.name], why.get(a.name)) == (a, None)


def test_llm_applications_on_any_gpu_and_on_a_type_named_gpu_are_held_to_the_pod_limit_group_by_group() -> None:
    shape = dataclasses.replace(SHAPE, max_worker_pods=2)
    apps = [llm(0, 2, "", 1), llm(1, 2, "GPU", 1)]  # two groups of two pods
    assert rayservice.within_limit(apps, shape, {}) == (apps, {})
    groups = rayservice.render_rayservice("s", "ns", apps, shape)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sorted(g["replicas"] for g in groups if g["groupName"].startswith("llm-")) == [2, 2]


def test_a_replica_in_pipeline_stages_gets_a_pod_with_all_its_gpus() -> None:
    config = serve_config.LlmApp(model_id="l", source="/mnt/models/l", tensor_parallel_size=4, pipeline_parallel_size=2,
                                 accelerator_type="H100")
    app = ServeAppSpec(name="ep-l", route_prefix="/ep/l", model_name="l", runtime="vllm", num_replicas=2, cpu=8.0,
                       memory_mib=64 * 1024, gpus=8.0, llm=config)
    groups = rayservice.render_rayservice("s", "ns", [app], SHAPE)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (group,) = [g for g in groups if g["groupName"].startswith("llm-")]
    (container,) = group["template"]["spec"]["containers"]
    assert (group["groupName"], group["replicas"], container["resources"]["limits"]["nvidia.com/gpu"]) == ("llm-h100-x8", 2, "8")
