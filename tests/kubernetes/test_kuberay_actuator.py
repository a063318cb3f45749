"""KubeRayActuator over real HTTP against a stateful Kubernetes API emulator (kmock).

kmock's gaps, and how these tests live with them: its POST answers without the created
object (so the actuator never relies on create's answer), it keeps no resourceVersion (the
actuator decides on its spec-hash annotation instead) and it has no namespaces (none are
created). Status is written into the stored object directly, as the operator would.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import kmock
import kubernetes
import pytest
import yaml

from orchestrator import ports
from orchestrator.adapters import kuberay, rayservice, rayservice_status, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec, ServeAppState
from orchestrator.reconciler import planning

SHA = "b" * 64
NS = "edge-dc"
RES = kmock.resource("ray.io", "v1", "rayservices")
SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0")


def app(name: str, **kw: Any) -> ServeAppSpec:
    base: dict[str, Any] = {
        "name": name,
        "route_prefix": f"/ep/{name[3:]}",
        "model_name": name[3:],
        "runtime": "onnx",
        "num_replicas": 2,
        "cpu": 1.0,
        "memory_mib": 1024,
        "gpus": 0.0,
        "artifact_uri": "https://models.example/m.onnx",
        "sha256": SHA,
    }
    base.update(kw)
    return ServeAppSpec(**base)


USER_APP = ServeAppSpec(
    name="ep-llm", route_prefix="/ep/llm", model_name="llm", runtime="ray-serve",
    num_replicas=2, cpu=4.0, memory_mib=8192, gpus=1.0,
    import_path="llm_service.app:build", args={"model": "mistral", "max_tokens": 512},
)  # fmt: skip


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
    apps = [app(planning.app_name("b--a", "d", v), route_prefix=planning.route_prefix("b--a", "d", v)) for v in ("big", "small")]
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


@pytest.fixture
async def kube() -> AsyncIterator[kmock.KubernetesEmulator]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        yield emulator


def _client(url: str) -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration()
    config.host = url.rstrip("/")
    config.retries = 0
    return kubernetes.client.ApiClient(config)


@pytest.fixture
async def actuator(kube: kmock.KubernetesEmulator) -> AsyncIterator[kuberay.KubeRayActuator]:
    act = kuberay.KubeRayActuator(_client(str(kube.url)), NS, "paris-dc", shape=SHAPE)
    yield act
    await act.close()


def _writes(kube: kmock.KubernetesEmulator) -> list[str]:
    return [str(r.method).rsplit(".", 1)[-1] for r in list(kube) if str(r.method) != "method.GET"]


def _set_status(kube: kmock.KubernetesEmulator, status: dict[str, Any]) -> None:
    kube.objects[RES, NS, "edgeplane-paris-dc"].patch({"status": status})


RUNNING_STATUS = {
    "serviceStatus": "Running",
    "activeServiceStatus": {
        "rayClusterName": "edgeplane-paris-dc-abc12",
        "applicationStatuses": {
            "ep-intent": {
                "status": "RUNNING",
                "serveDeploymentStatuses": {"OnnxModel": {"status": "HEALTHY"}},
            },
            "ep-llm": {
                "status": "DEPLOY_FAILED",
                "message": 'Traceback (most recent call last):\n  File "x"\n'
                "ModuleNotFoundError: No module named 'llm_service'",
                "serveDeploymentStatuses": {},
            },
        },
    },
}


async def test_create_observe_patch_delete(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    assert await actuator.observe() == {}
    await actuator.apply([app("ep-intent")])
    assert _writes(kube) == ["POST"]
    stored = kube.objects[RES, NS, "edgeplane-paris-dc"]
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "edgeplane"

    (pending,) = (await actuator.observe()).values()
    assert pending.status is ServeAppState.NOT_STARTED and pending.replicas_target == 2

    _set_status(kube, copy.deepcopy(RUNNING_STATUS))
    statuses = await actuator.observe()
    intent = statuses["ep-intent"]
    assert (intent.status, intent.replicas_running, intent.replicas_target) == (
        ServeAppState.RUNNING, 2, 2,
    )  # fmt: skip
    assert intent.endpoint_url == (
        "http://edgeplane-paris-dc-serve-svc.edge-dc.svc.cluster.local:8000/ep/intent"
    )

    await actuator.apply([app("ep-intent")])  # unchanged: no write
    assert _writes(kube) == ["POST"]

    await actuator.apply([app("ep-intent", num_replicas=5), USER_APP])
    assert _writes(kube) == ["POST", "PATCH"]
    stored = kube.objects[RES, NS, "edgeplane-paris-dc"]
    serve = yaml.safe_load(stored["spec"]["serveConfigV2"])
    assert [a["deployments"][0]["num_replicas"] for a in serve["applications"][:1]] == [5]
    assert serve["applications"][1]["import_path"] == "llm_service.app:build"
    assert serve["applications"][1]["args"] == {"model": "mistral", "max_tokens": 512}
    groups = {
        g["groupName"]: g["replicas"]
        for g in stored["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    assert groups == {"cpu": 2, "gpu": 2}

    failed = (await actuator.observe())["ep-llm"]
    assert failed.status is ServeAppState.DEPLOY_FAILED
    assert failed.message == "ModuleNotFoundError: No module named 'llm_service'"

    await actuator.apply([])
    assert _writes(kube) == ["POST", "PATCH", "DELETE"]
    assert await actuator.observe() == {}
    await actuator.apply([])  # already gone: nothing to do
    assert _writes(kube) == ["POST", "PATCH", "DELETE"]


async def test_applications_answer_from_the_active_cluster_while_kuberay_builds_a_new_one(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    """KubeRay (v1.3 on) reports only the new cluster's applications while it builds one
    beside the active cluster, which serves on until the switch."""
    healthy = RUNNING_STATUS["activeServiceStatus"]["applicationStatuses"]["ep-intent"]
    ready = {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
             "lastTransitionTime": "2026-12-07T07:00:00Z"}
    upgrade = {**ready, "type": "UpgradeInProgress", "reason": "BothActivePendingClustersExist"}
    await actuator.apply([app("ep-intent")])
    _set_status(kube, {"numServeEndpoints": 2, "conditions": [ready], "activeServiceStatus": {
        "rayClusterName": "edgeplane-paris-dc-abc12", "applicationStatuses": {"ep-intent": healthy}}})
    assert (await actuator.observe())["ep-intent"].replicas_running == 2

    kube.objects[RES, NS, "edgeplane-paris-dc"].patch({"status": {
        "conditions": [ready, upgrade],
        "activeServiceStatus": {"applicationStatuses": None},
        "pendingServiceStatus": {"rayClusterName": "edgeplane-paris-dc-xyz89", "applicationStatuses": {"ep-intent": {
            "status": "DEPLOYING", "serveDeploymentStatuses": {"OnnxModel": {"status": "UPDATING"}}}}}}})
    for _ in range(2):  # and on, from what was read before the upgrade
        during = (await actuator.observe())["ep-intent"]
        assert (during.status, during.replicas_running, during.answers) == (ServeAppState.RUNNING, 2, True)


async def test_an_application_no_pod_holds_is_left_out_and_reported_while_the_others_are_applied(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    """The scheduler places by the Site's declared capacity, which knows no pod shape: one
    such replica must not stop the site's other applications from changing."""
    await actuator.apply([app("ep-intent"), app("ep-big", cpu=8)])
    served = yaml.safe_load(kube.objects[RES, NS, "edgeplane-paris-dc"]["spec"]["serveConfigV2"])["applications"]
    assert [a["name"] for a in served] == ["ep-intent"]
    big = (await actuator.observe())["ep-big"]
    assert (big.status, big.replicas_running, big.endpoint_url) == (ServeAppState.DEPLOY_FAILED, 0, None)
    assert big.message == ("a replica asks for 8 CPU / 1024 MiB but a CPU worker pod offers 4 CPU / 9830 MiB usable: "
                           "left out of RayService edge-dc/edgeplane-paris-dc"), big.message

    await actuator.apply([app("ep-big", cpu=8)])  # the one left: nothing to run
    assert (RES, NS, "edgeplane-paris-dc") not in kube.objects or kube.objects[RES, NS, "edgeplane-paris-dc"].deleted
    assert (await actuator.observe())["ep-big"].status is ServeAppState.DEPLOY_FAILED
    await actuator.apply([app("ep-intent")])
    assert "ep-big" not in await actuator.observe()


def _served(kube: kmock.KubernetesEmulator) -> dict[str, int]:
    """The applications the RayService configures, by name: their replica counts."""
    serve = yaml.safe_load(kube.objects[RES, NS, "edgeplane-paris-dc"]["spec"]["serveConfigV2"])
    return {a["name"]: a["deployments"][0]["num_replicas"] for a in serve["applications"]}


async def test_applications_past_the_worker_pod_limit_are_left_out_and_the_others_still_change(
    kube: kmock.KubernetesEmulator,
) -> None:
    """Replicas that would pass ``max_worker_pods`` failed the site's whole apply: nothing
    was written, so a deleted deployment's application ran on and no scale reached the
    site. The applications the RayService runs come first, then new ones by name: a new one
    past the limit is left out and reported, and the deletion goes through."""
    shape = dataclasses.replace(SHAPE, max_worker_pods=2)
    actuator = kuberay.KubeRayActuator(_client(str(kube.url)), NS, "paris-dc", shape=shape)
    try:
        whole_pod = {"num_replicas": 1, "cpu": 4.0}  # a CPU worker pod each
        assert await actuator.apply([app("ep-a", **whole_pod), app("ep-c", **whole_pod)]) == {}
        left = await actuator.apply([app("ep-d", **whole_pod), app("ep-b", **whole_pod), app("ep-a", **whole_pod)])
        assert _served(kube) == {"ep-a": 1, "ep-b": 1}  # ep-c deleted, ep-d past the limit
        why = "its replicas would take the RayService's CPU worker pods past the limit of 2 (max_worker_pods)"
        assert left == {"ep-d": why}, left
        d = (await actuator.observe())["ep-d"]
        assert (d.status, d.replicas_running, d.endpoint_url) == (ServeAppState.DEPLOY_FAILED, 0, None)
        assert d.message == f"{why}: left out of RayService edge-dc/edgeplane-paris-dc", d.message

        assert await actuator.apply([app("ep-d", **whole_pod), app("ep-b", **whole_pod)]) == {}  # room once ep-a goes
        assert _served(kube) == {"ep-b": 1, "ep-d": 1}
        assert (await actuator.observe())["ep-d"].status is ServeAppState.NOT_STARTED
    finally:
        await actuator.close()


async def test_an_application_whose_scale_up_passes_the_worker_pod_limit_keeps_the_replicas_it_runs(
    kube: kmock.KubernetesEmulator,
) -> None:
    """Left out, it would be removed from the cluster, its model gone from the site for
    asking for more; it stays at the count it runs and says why it does not grow."""
    shape = dataclasses.replace(SHAPE, max_worker_pods=2)
    actuator = kuberay.KubeRayActuator(_client(str(kube.url)), NS, "paris-dc", shape=shape)
    try:
        await actuator.apply([app("ep-a", num_replicas=1, cpu=4.0), app("ep-b", num_replicas=1, cpu=4.0)])
        healthy = {"status": "RUNNING", "serveDeploymentStatuses": {"OnnxModel": {"status": "HEALTHY"}}}
        _set_status(kube, {"activeServiceStatus": {"applicationStatuses": {"ep-a": healthy, "ep-b": healthy}}})
        left = await actuator.apply([app("ep-a", num_replicas=3, cpu=4.0), app("ep-b", num_replicas=1, cpu=4.0)])
        assert _served(kube) == {"ep-a": 1, "ep-b": 1}
        why = ("kept at the 1 replica(s) it runs: 3 would take the RayService's CPU worker pods past the limit of 2 "
               "(max_worker_pods)")
        assert left == {"ep-a": why}, left
        a = (await actuator.observe())["ep-a"]
        assert (a.status, a.replicas_running, a.replicas_target, a.message) == (ServeAppState.RUNNING, 1, 3, why), a

        await actuator.apply([app("ep-a", num_replicas=2, cpu=4.0)])  # ep-b deleted: room for it
        assert _served(kube) == {"ep-a": 2}
        assert (await actuator.observe())["ep-a"].message == ""
    finally:
        await actuator.close()


async def test_an_application_that_grows_never_takes_the_room_of_one_that_runs_unchanged(
    kube: kmock.KubernetesEmulator,
) -> None:
    """ep-a, first by name, asks one pod more and would take ep-b's pod: ep-b, asked as it
    runs, would be removed from the cluster for another's growth. It keeps its pod, and ep-a
    stays at the count it runs until there is room."""
    shape = dataclasses.replace(SHAPE, max_worker_pods=2)
    actuator = kuberay.KubeRayActuator(_client(str(kube.url)), NS, "paris-dc", shape=shape)
    try:
        await actuator.apply([app("ep-a", num_replicas=1, cpu=4.0), app("ep-b", num_replicas=1, cpu=4.0)])
        left = await actuator.apply([app("ep-a", num_replicas=2, cpu=4.0), app("ep-b", num_replicas=1, cpu=4.0)])
        assert _served(kube) == {"ep-a": 1, "ep-b": 1}
        assert left == {"ep-a": "kept at the 1 replica(s) it runs: 2 would take the RayService's CPU worker pods past the "
                                "limit of 2 (max_worker_pods)"}, left
    finally:
        await actuator.close()


async def test_a_rayservice_another_writer_changed_is_drift_until_applied_again(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    """A deposed leader's patch that lands after the new leader's (or a hand edit that sets
    the spec hash): the actuator that applied last says so, and applying again fixes it."""
    await actuator.observe()
    assert actuator.drift == ""  # nothing applied yet: nothing to compare
    await actuator.apply([app("ep-intent")])
    await actuator.observe()
    assert actuator.drift == ""
    deposed = kuberay.KubeRayActuator(_client(str(kube.url)), NS, "paris-dc", shape=SHAPE)
    try:
        await deposed.apply([app("ep-intent", num_replicas=5)])
    finally:
        await deposed.close()
    await actuator.observe()
    assert "was changed by another writer" in actuator.drift
    await actuator.apply([app("ep-intent")])
    serve = yaml.safe_load(kube.objects[RES, NS, "edgeplane-paris-dc"]["spec"]["serveConfigV2"])
    assert serve["applications"][0]["deployments"][0]["num_replicas"] == 2  # ours again
    await actuator.observe()
    assert actuator.drift == ""

    kube.objects[RES, NS, "edgeplane-paris-dc"].delete()  # removed by hand
    await actuator.observe()
    assert actuator.drift.endswith("is gone")
    await actuator.apply([])
    await actuator.observe()
    assert actuator.drift == ""


@pytest.mark.parametrize(
    "serve_config_v2",
    ["applications:\n- import_path: team.app:build\n", "applications: oops\n", "- a list\n", "applications: [\n"],
    ids=["application-without-name", "applications-not-a-list", "not-a-mapping", "not-yaml"],
)
async def test_a_hand_edited_serve_config_is_drift_that_the_next_apply_repairs(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator, serve_config_v2: str
) -> None:
    await actuator.apply([app("ep-intent")])
    kube.objects[RES, NS, "edgeplane-paris-dc"].patch({"spec": {"serveConfigV2": serve_config_v2}})  # spec hash left alone
    assert await actuator.observe() == {}
    assert "serveConfigV2" in actuator.drift
    await actuator.apply([app("ep-intent")])
    assert _writes(kube) == ["POST", "PATCH"]
    assert set(await actuator.observe()) == {"ep-intent"}
    assert actuator.drift == ""


async def test_refused_credentials_are_an_auth_error(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    kube["get"] << 403
    with pytest.raises(kuberay.KubernetesAuthError) as refused:
        await actuator.observe()
    assert refused.value.retryable is False


async def test_invalid_object_is_rejected_not_retried(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    kube["post"] << 422
    with pytest.raises(kuberay.KubernetesRejected):
        await actuator.apply([app("ep-a")])


async def test_unreachable_api_server() -> None:

    (port,) = ports.free_ports(1)
    act = kuberay.KubeRayActuator(_client(f"http://127.0.0.1:{port}"), NS, "s", shape=SHAPE)
    with pytest.raises(kuberay.KubernetesUnreachable) as down:
        await act.observe()
    assert isinstance(down.value, serve_config.DataCentreError) and down.value.retryable
    await act.close()


def llm_app(name: str, accelerator: str | None, tp: int, replicas: int, autoscaling: tuple[int, int] | None = None,
            memory_gib: int = 96) -> ServeAppSpec:
    llm = serve_config.LlmApp(model_id=name[3:], source=f"/mnt/models/{name[3:]}", engine_kwargs={"max_model_len": 8192},
                              tensor_parallel_size=tp, accelerator_type=accelerator, autoscaling=autoscaling)
    return ServeAppSpec(name=name, route_prefix=f"/ep/{name[3:]}", model_name=name[3:], runtime="vllm",
                        num_replicas=replicas, cpu=8.0, memory_mib=memory_gib * 1024, gpus=float(tp), llm=llm)


LLM_SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0",
                                    llm_image="registry.example/ray-llm:2.60.0-py311-cu128",
                                    accelerator_node_selectors={"H100": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}})


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


def _configured(kube: kmock.KubernetesEmulator) -> dict[str, Any]:
    """The Serve config entries of the RayService, by application name."""
    return {a["name"]: a for a in yaml.safe_load(kube.objects[RES, NS, "edgeplane-paris-dc"]["spec"]["serveConfigV2"])["applications"]}


@pytest.mark.parametrize(
    ("runs", "update", "limit", "why"),
    [
        (app("ep-a", num_replicas=4, cpu=1.0), app("ep-a", num_replicas=4, cpu=4.0), 2,
         "its replicas would take the RayService's CPU worker pods past the limit of 2 (max_worker_pods)"),
        (llm_app("ep-a", "H100", 1, 1, autoscaling=(1, 2)), llm_app("ep-a", "H100", 1, 1, autoscaling=(1, 8)), 4,
         "its replicas would take the RayService's H100 x1 LLM worker pods past the limit of 4 (max_worker_pods)"),
        (app("ep-a", num_replicas=1, cpu=1.0), app("ep-a", num_replicas=1, cpu=8.0), 2,
         "a replica asks for 8 CPU / 1024 MiB but a CPU worker pod offers 4 CPU / 9830 MiB usable"),
    ],
    ids=["more-cpu-a-replica", "llm-autoscaling-maximum", "no-longer-fits-a-pod"],
)
async def test_an_application_whose_update_the_cluster_cannot_take_runs_on_as_it_runs(
    kube: kmock.KubernetesEmulator, runs: ServeAppSpec, update: ServeAppSpec, limit: int, why: str,
) -> None:
    """Left out of the RayService, it would be removed from the cluster, its model gone from
    the site for an update the cluster cannot take; its status says why it is not updated."""
    shape = dataclasses.replace(LLM_SHAPE, max_worker_pods=limit)
    actuator = kuberay.KubeRayActuator(_client(str(kube.url)), NS, "paris-dc", shape=shape)
    try:
        assert await actuator.apply([runs, app("ep-b", num_replicas=1, cpu=4.0)]) == {}
        before = _configured(kube)
        _set_status(kube, {"activeServiceStatus": {"applicationStatuses": {
            name: {"status": "RUNNING", "serveDeploymentStatuses": {"d": {"status": "HEALTHY"}}} for name in before}}})
        kept = f"kept as it runs, its update not applied: {why}"
        assert await actuator.apply([update, app("ep-b", num_replicas=1, cpu=4.0)]) == {"ep-a": kept}
        assert _configured(kube) == before
        a = (await actuator.observe())["ep-a"]
        assert (a.status, a.message) == (ServeAppState.RUNNING, kept), a

        assert await actuator.apply([update, app("ep-b", num_replicas=1, cpu=4.0)]) == {"ep-a": kept}  # and on
        assert _configured(kube) == before
    finally:
        await actuator.close()


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


LONG = "paris-saclay-datacentre-gpu-cluster-a1"  # 38 characters: "edgeplane-" + it is past KubeRay's 47


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


async def test_a_long_named_site_replaces_its_rayservice_named_the_earlier_way(kube: kmock.KubernetesEmulator) -> None:
    """Earlier versions cut the name at 63 characters: the object of this site under that name
    goes (an older KubeRay ran it), another site's that shared it stays."""
    earlier = ("edgeplane-" + LONG)[:63]
    other_site = rayservice.render_rayservice("paris-saclay-datacentre-gpu-cluster-b", NS, [app("ep-b")], SHAPE)
    kube.objects[RES, NS, earlier] = {**rayservice.render_rayservice(LONG, NS, [app("ep-a")], SHAPE), "metadata": {
        "name": earlier, "namespace": NS, "labels": {rayservice.SITE_LABEL: LONG}}}
    act = kuberay.KubeRayActuator(_client(str(kube.url)), NS, LONG, shape=SHAPE)
    try:
        await act.apply([app("ep-a")])
        assert kube.objects[RES, NS, earlier].deleted
        assert kube.objects[RES, NS, act.name]["metadata"]["labels"][rayservice.SITE_LABEL] == LONG
        kube.objects[RES, NS, earlier] = {**other_site, "metadata": {**other_site["metadata"], "name": earlier}}
        await kuberay.KubeRayActuator(_client(str(kube.url)), NS, LONG, shape=SHAPE).apply([app("ep-a")])
        assert not kube.objects[RES, NS, earlier].deleted  # another site's: left alone
    finally:
        await act.close()


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


def test_the_in_cluster_context_uses_the_pods_service_account(tmp_path: pathlib.Path) -> None:
    (tmp_path / "token").write_text("sa-token-1")  # as the kubelet writes it
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    client = kuberay.api_client_for(kuberay.IN_CLUSTER, environ=pod, service_account_dir=str(tmp_path))
    config = client.configuration
    assert config.host == "https://10.96.0.1:443" and config.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert client.configuration.auth_settings()["BearerToken"]["value"] == "bearer sa-token-1"  # what requests send
    with pytest.raises(kuberay.KubernetesError, match="context 'in-cluster': not running in a Kubernetes pod"):
        kuberay.api_client_for(kuberay.IN_CLUSTER, environ={}, service_account_dir=str(tmp_path))
    with pytest.raises(kuberay.KubernetesError, match="context 'in-cluster': not running in a Kubernetes pod"):
        kuberay.api_client_for(kuberay.IN_CLUSTER, environ=pod, service_account_dir=str(tmp_path / "missing"))


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


GPU_APP = app("ep-vision", gpus=1.0, memory_mib=1024)


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


async def test_a_gpu_application_added_and_removed_keeps_the_worker_groups_in_place(
        kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator) -> None:
    def groups() -> list[tuple[str, int]]:
        stored = kube.objects[RES, NS, "edgeplane-paris-dc"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        return [(g["groupName"], g["replicas"]) for g in stored]

    await actuator.apply([app("ep-intent"), llm_app("ep-chat", "H100", 1, 1)])
    assert groups() == [("cpu", 1), ("llm-h100-x1", 1)]
    await actuator.apply([app("ep-intent"), llm_app("ep-chat", "H100", 1, 1), GPU_APP])
    assert groups() == [("cpu", 1), ("llm-h100-x1", 1), ("gpu", 2)]
    await actuator.apply([app("ep-intent"), llm_app("ep-chat", "H100", 1, 1)])
    assert groups() == [("cpu", 1), ("llm-h100-x1", 1), ("gpu", 0)]
    await actuator.apply([app("ep-intent"), llm_app("ep-chat", "H100", 1, 1)])  # as it is: nothing to write
    assert _writes(kube) == ["POST", "PATCH", "PATCH"]
