"""The RayService rendered for a site's applications, with no cluster: it validates against
the real KubeRay CRD, its worker groups are sized from the applications (per accelerator
and tensor parallelism for LLMs) or the replicas no pod holds are refused, its name is one
KubeRay reconciles, adding or removing an application updates the running cluster in place
by KubeRay's own rule, and the statuses KubeRay writes into it read back as applications'."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
import yaml
from rayservice_apps import GPU_APP, LLM_SHAPE, LONG, NS, SHAPE, USER_APP, app, llm_app

from orchestrator.adapters import rayservice, rayservice_status, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec, ServeAppState
from orchestrator.reconciler import applications


@pytest.mark.parametrize(
    "apps",
    [[app("ep-intent")], [app("ep-intent"), USER_APP], [app("ep-a", cpu=0.25, memory_mib=0)]],
    ids=["cpu", "cpu+gpu", "fractional"],
)
def test_rendered_rayservice_validates_against_the_crd(
    rayservice_validator: Any, apps: list[ServeAppSpec]
) -> None:
    obj = rayservice.render_rayservice("paris-dc", NS, apps, SHAPE)
    rayservice_validator.validate(obj)
    serve = yaml.safe_load(obj["spec"]["serveConfigV2"])
    assert [a["name"] for a in serve["applications"]] == [a.name for a in apps]


def test_two_variants_of_a_deployment_on_a_site_are_two_applications_each_at_its_route(rayservice_validator: Any) -> None:
    apps = [app(applications.app_name("b--a", "d", v), route_prefix=applications.route_prefix("b--a", "d", v)) for v in ("big", "small")]
    obj = rayservice.render_rayservice("b--a", NS, apps, SHAPE)
    rayservice_validator.validate(obj)
    running = {"status": "RUNNING", "serveDeploymentStatuses": {serve_config.ONNX_DEPLOYMENT: {"status": "HEALTHY"}}}
    obj["status"] = {"activeServiceStatus": {"applicationStatuses": {a.name: running for a in apps}}}
    statuses = rayservice_status.statuses_from_rayservice(obj, "http://svc:8000")
    assert {s.endpoint_url: s.replicas_running for s in statuses.values()} == {
        "http://svc:8000/ep/b--a/d/big": 2, "http://svc:8000/ep/b--a/d/small": 2}


def test_crd_schema_catches_a_broken_object(rayservice_validator: Any) -> None:
    obj = rayservice.render_rayservice("paris-dc", NS, [app("ep-a")], SHAPE)
    del obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        rayservice_validator.validate(obj)


@pytest.mark.parametrize(
    ("apps", "groups"),
    [
        ([app("ep-a", num_replicas=1, cpu=1, memory_mib=512)], {"cpu": 1}),
        ([app("ep-a", num_replicas=8, cpu=1, memory_mib=512)], {"cpu": 2}),
        ([app("ep-a", num_replicas=9, cpu=1, memory_mib=512)], {"cpu": 3}),
        ([app("ep-a", num_replicas=2, cpu=0.5, memory_mib=9000)], {"cpu": 2}),  # memory-bound
        ([app("ep-a", num_replicas=0)], {"cpu": 0}),
        ([app("ep-a", num_replicas=3, cpu=2, gpus=1, memory_mib=1024)], {"cpu": 0, "gpu": 3}),
        (
            [app("ep-a", num_replicas=4, cpu=1, gpus=0.5, memory_mib=0), app("ep-b")],
            {"cpu": 1, "gpu": 2},
        ),
    ],
)
def test_worker_groups_are_sized_from_the_apps(
    apps: list[ServeAppSpec], groups: dict[str, int]
) -> None:
    obj = rayservice.render_rayservice("s", NS, apps, SHAPE)
    sized = {
        g["groupName"]: g["replicas"] for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    assert sized == groups
    gpu_groups = [
        g for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"
    ]
    for group in gpu_groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (app("ep-a", cpu=16), "CPU"),
        (app("ep-a", memory_mib=64 * 1024), "MiB"),
        (app("ep-a", gpus=2), "2 GPU but a GPU worker pod offers"),
        (app("ep-a", num_replicas=1000), "limit"),
    ],
)
def test_replicas_that_fit_no_pod_are_refused(spec: ServeAppSpec, fragment: str) -> None:
    with pytest.raises(rayservice.ClusterShapeError, match=fragment) as refused:
        rayservice.render_rayservice("s", NS, [spec], SHAPE)
    assert refused.value.retryable is False


def test_llm_apps_get_gpu_worker_groups_per_accelerator_and_parallelism(rayservice_validator: Any) -> None:
    apps = [app("ep-intent"), llm_app("ep-gpt-oss-120b", "H100", 1, 2), llm_app("ep-llama", "H100", 8, 1, autoscaling=(1, 3)),
            llm_app("ep-gpt-oss-20b", "L40S", 1, 1)]
    obj = rayservice.render_rayservice("paris-dc", NS, apps, LLM_SHAPE)
    rayservice_validator.validate(obj)
    groups = {g["groupName"]: g for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert {name: g["replicas"] for name, g in groups.items()} == {"cpu": 1, "llm-h100-x1": 2, "llm-h100-x8": 3, "llm-l40s-x1": 1}
    h100x8 = groups["llm-h100-x8"]["template"]["spec"]
    (container,) = h100x8["containers"]
    assert container["image"] == "registry.example/ray-llm:2.60.0-py311-cu128"
    # 96 GiB asked per replica / 0.6 of a pod usable for actors = 160 GiB
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "160Gi", "nvidia.com/gpu": "8"}
    assert h100x8["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # a GPU model without a known product label selects on the label a platform team sets
    assert groups["llm-l40s-x1"]["template"]["spec"]["nodeSelector"] == {rayservice.ACCELERATOR_LABEL: "L40S"}
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == "registry.example/edgeplane-ray:2.60.0"
    serve = yaml.safe_load(obj["spec"]["serveConfigV2"])
    llm = next(a for a in serve["applications"] if a["name"] == "ep-llama")
    assert llm["import_path"] == "ray.serve.llm:build_openai_app"
    assert llm["args"]["llm_configs"][0]["placement_group_config"]["strategy"] == "STRICT_PACK"


def test_too_many_llm_pods_are_refused() -> None:
    with pytest.raises(rayservice.ClusterShapeError, match="GPU pods"):
        rayservice.render_rayservice("s", NS, [llm_app("ep-x", "H100", 1, 65)], LLM_SHAPE)


def test_llm_app_status_from_the_rayservice_counts_its_engine_replicas() -> None:
    apps = [llm_app("ep-gpt", "H100", 1, 2), llm_app("ep-llama", "H100", 8, 1, autoscaling=(1, 3))]
    obj = rayservice.render_rayservice("s", NS, apps, LLM_SHAPE)
    healthy = {"status": "HEALTHY"}
    obj["status"] = {"activeServiceStatus": {"applicationStatuses": {
        "ep-gpt": {"status": "RUNNING", "serveDeploymentStatuses": {"OpenAiIngress": healthy, "LLMServer:gpt": healthy}},
        "ep-llama": {"status": "DEPLOYING", "serveDeploymentStatuses": {"LLMServer:llama": {"status": "UPDATING"}}},
    }}}
    statuses = rayservice_status.statuses_from_rayservice(obj, "http://svc:8000")
    assert (statuses["ep-gpt"].replicas_running, statuses["ep-gpt"].replicas_target) == (2, 2)
    assert statuses["ep-gpt"].endpoint_url == "http://svc:8000/ep/gpt"
    assert (statuses["ep-llama"].status, statuses["ep-llama"].replicas_running, statuses["ep-llama"].replicas_target) == (
        ServeAppState.DEPLOYING, 0, 1)


@pytest.mark.parametrize(
    ("site", "name"),
    [
        ("paris-dc", "edgeplane-paris-dc"),
        ("a" * 37, "edgeplane-" + "a" * 37),  # 47 characters: as it is
        (LONG, "edgeplane-paris-saclay-datacentre-gp-"),  # then a digest of the whole name
        ("x" * 25 + "-" + "y" * 37, "edgeplane-" + "x" * 25 + "-"),  # no "--" where the cut falls on a dash
    ],
)
def test_a_rayservice_name_is_one_kuberay_reconciles(site: str, name: str) -> None:
    got = rayservice.rayservice_name(site)
    assert got.startswith(name) and len(got) <= 47, got
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", got) and "--" not in got[len("edgeplane-"):], got


def test_long_site_names_that_begin_alike_get_rayservices_of_their_own() -> None:
    names = {rayservice.rayservice_name("x" * 53 + suffix) for suffix in ("-site-a", "-site-b", "a", "b")}
    assert len(names) == 4


@pytest.mark.parametrize(("app_status", "deployment_status", "running"), [
    ("RUNNING", "UPSCALING", 3),  # Serve's own autoscaler
    ("RUNNING", "DOWNSCALING", 3),
    ("DEPLOYING", "UPSCALING", 1),  # num_replicas changed through the config, as edgeplane scales
    ("DEPLOYING", "DOWNSCALING", 1),
    ("DEPLOYING", "UPDATING", 0),  # a new config rolling out: not known to answer
    ("UNHEALTHY", "UNHEALTHY", 0),
])
def test_an_application_that_scales_stays_serving(app_status: str, deployment_status: str, running: int) -> None:
    """An application whose replica count changes keeps its replicas answering, whether
    Serve says RUNNING (its autoscaler) or DEPLOYING (a count changed through the config):
    it stays an endpoint; KubeRay reports no counts, so one DEPLOYING counts one."""
    obj = rayservice.render_rayservice("s", NS, [app("ep-intent", num_replicas=3)], SHAPE)
    obj["status"] = {"activeServiceStatus": {"applicationStatuses": {"ep-intent": {
        "status": app_status, "serveDeploymentStatuses": {serve_config.ONNX_DEPLOYMENT: {"status": deployment_status}}}}}}
    status = rayservice_status.statuses_from_rayservice(obj, "http://svc:8000")["ep-intent"]
    assert (status.status, status.replicas_running, status.replicas_target) == (ServeAppState(app_status), running, 3)
    assert status.answers is (running > 0)


def _without_counts(config: dict[str, Any], groups: int | None = None) -> dict[str, Any]:
    muted = copy.deepcopy(config)
    muted["workerGroupSpecs"] = [{k: v for k, v in g.items() if k not in ("replicas", "minReplicas", "maxReplicas")}
                                 for g in muted["workerGroupSpecs"][:groups]]
    return muted


def kuberay_updates_in_place(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """KubeRay's rule (rayservice_controller.go, isClusterSpecHashEqual): the running cluster is
    updated in place when the cluster specs are equal but for the groups' replica counts, or
    are once the groups appended at the end are left out; otherwise a new cluster is built."""
    a, b = old["spec"]["rayClusterConfig"], new["spec"]["rayClusterConfig"]
    kept = len(a["workerGroupSpecs"])
    return len(b["workerGroupSpecs"]) >= kept and _without_counts(a) == _without_counts(b, kept)


@pytest.mark.parametrize(
    "steps",
    [
        [[app("ep-a"), llm_app("ep-chat", "L4", 1, 1)], [app("ep-a"), llm_app("ep-chat", "L4", 1, 1), GPU_APP]],
        [[app("ep-a"), GPU_APP], [app("ep-a")], [app("ep-a"), GPU_APP]],
        [[llm_app("ep-chat", "L4", 1, 1)], [llm_app("ep-chat", "L4", 1, 1), llm_app("ep-big", "H100", 1, 1)], [llm_app("ep-big", "H100", 1, 2)]],
        [[app("ep-a", num_replicas=1)], [app("ep-a", num_replicas=9)]],
        [[llm_app("ep-chat", "H100", 1, 1, memory_gib=16), llm_app("ep-coder", "H100", 1, 1)], [llm_app("ep-chat", "H100", 1, 1, memory_gib=16)],
         [llm_app("ep-chat", "H100", 1, 1, memory_gib=16), llm_app("ep-coder", "H100", 1, 1)]],
    ],
    ids=["gpu-app-beside-an-llm", "last-gpu-app-removed-then-back", "llm-types-come-and-go", "replicas-only",
         "largest-llm-app-removed-then-back"],
)
def test_adding_or_removing_an_application_updates_the_running_cluster_in_place(
        rayservice_validator: Any, steps: list[list[ServeAppSpec]]) -> None:
    running = rayservice.render_rayservice("s", NS, steps[0], LLM_SHAPE)
    for apps in steps[1:]:
        nxt = rayservice.render_rayservice("s", NS, apps, LLM_SHAPE, running_groups=running["spec"]["rayClusterConfig"]["workerGroupSpecs"])
        rayservice_validator.validate(nxt)
        assert kuberay_updates_in_place(running, nxt), [g["groupName"] for g in nxt["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
        running = nxt
    fresh = rayservice.render_rayservice("s", NS, steps[-1], LLM_SHAPE)  # every pod the apps need, and only those
    pods = {g["groupName"]: g["replicas"] for g in running["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["replicas"]}
    assert pods == {g["groupName"]: g["replicas"] for g in fresh["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["replicas"]}
