"""A control plane that starts (a restart, or another replica taking over as leader) finds
a RayService it did not write: what it knows of the applications there is what the
RayService says. Over real HTTP against kmock's stateful Kubernetes API emulator."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kubernetes
import pytest
import yaml

from orchestrator.adapters import kuberay, rayservice, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec, ServeAppState

NS, SITE = "edge-dc", "paris-dc"
RES = kmock.resource("ray.io", "v1", "rayservices")
SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0",
                                   llm_image="registry.example/ray-llm:2.60.0-py311-cu128")


def onnx(name: str, **kw: Any) -> ServeAppSpec:
    base: dict[str, Any] = {"name": name, "route_prefix": f"/ep/{name[3:]}", "model_name": name[3:], "runtime": "onnx",
                            "num_replicas": 1, "cpu": 1.0, "memory_mib": 1024, "artifact_uri": "https://models.example/m.onnx",
                            "sha256": "b" * 64}
    return ServeAppSpec(**{**base, **kw})


def llm(name: str, replicas: int, autoscaling: tuple[int, int] | None = None, cpu: float = 8.0) -> ServeAppSpec:
    engine = serve_config.LlmApp(model_id=name[3:], source=f"/mnt/models/{name[3:]}", engine_kwargs={"max_model_len": 8192},
                                 accelerator_type="H100", autoscaling=autoscaling)
    return ServeAppSpec(name=name, route_prefix=f"/ep/{name[3:]}", model_name=name[3:], runtime="vllm", num_replicas=replicas,
                        cpu=cpu, memory_mib=96 * 1024, gpus=1.0, llm=engine)


GENAI = onnx("ep-chat", runtime="onnx-genai", args={"max_concurrent_sequences": 4, "max_queued": 16},
             artifact_hosts=("models.example",))
USER = ServeAppSpec(name="ep-user", route_prefix="/ep/user", model_name="user", runtime="ray-serve", num_replicas=1, cpu=2.0,
                    memory_mib=512, gpus=0.0, import_path="pkg.app:build", args={"k": [1, 2]}, deployment="Ingress")


@pytest.fixture
async def kube() -> AsyncIterator[kmock.KubernetesEmulator]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        yield emulator


def actuator_on(kube: kmock.KubernetesEmulator, shape: rayservice.RayClusterShape) -> kuberay.KubeRayActuator:
    config = kubernetes.client.Configuration()
    config.host, config.retries = str(kube.url).rstrip("/"), 0
    return kuberay.KubeRayActuator(kubernetes.client.ApiClient(config), NS, SITE, shape=shape)


def configured(kube: kmock.KubernetesEmulator) -> dict[str, Any]:
    """The Serve config entries of the RayService, by application name."""
    text = kube.objects[RES, NS, rayservice.rayservice_name(SITE)]["spec"]["serveConfigV2"]
    return {a["name"]: a for a in yaml.safe_load(text)["applications"]}


ONE_POD = onnx("ep-b", cpu=4.0)


@pytest.mark.parametrize(
    ("runs", "update", "limit", "why"),
    [
        (onnx("ep-a", num_replicas=4), onnx("ep-a", num_replicas=4, cpu=4.0), 2,
         "its replicas would take the RayService's CPU worker pods past the limit of 2 (max_worker_pods)"),
        (onnx("ep-a"), onnx("ep-a", cpu=8.0), 2, "a replica asks for 8 CPU / 1024 MiB but a CPU worker pod offers 4 CPU / 9830 MiB usable"),
        (llm("ep-a", 1, autoscaling=(1, 2)), llm("ep-a", 1, autoscaling=(1, 8)), 4,
         "its replicas would take the RayService's H100 x1 LLM worker pods past the limit of 4 (max_worker_pods)"),
    ],
    ids=["more-cpu-a-replica", "no-longer-fits-a-pod", "llm-autoscaling-maximum"],
)
async def test_a_control_plane_that_starts_keeps_a_running_application_exactly_as_it_runs(
        kube: kmock.KubernetesEmulator, runs: ServeAppSpec, update: ServeAppSpec, limit: int, why: str) -> None:
    """It had no record of how the application ran and took the new ask at the count the
    RayService configures: past the limit or fitting no pod, the application was removed
    from the cluster (or changed). The RayService's Serve config says how it runs."""
    shape = dataclasses.replace(SHAPE, max_worker_pods=limit)
    first = actuator_on(kube, shape)
    try:
        assert await first.apply([runs, ONE_POD]) == {}
    finally:
        await first.close()
    before = configured(kube)
    healthy = {"status": "RUNNING", "serveDeploymentStatuses": {"d": {"status": "HEALTHY"}}}
    kube.objects[RES, NS, rayservice.rayservice_name(SITE)].patch(
        {"status": {"activeServiceStatus": {"applicationStatuses": dict.fromkeys(before, healthy)}}})

    restarted = actuator_on(kube, shape)
    try:
        kept = f"kept as it runs, its update not applied: {why}"
        assert await restarted.apply([update, ONE_POD]) == {"ep-a": kept}
        assert configured(kube) == before
        a = (await restarted.observe())["ep-a"]
        assert (a.status, a.message) == (ServeAppState.RUNNING, kept), a
    finally:
        await restarted.close()


@pytest.mark.parametrize("runs", [onnx("ep-a", gpus=0.5, memory_mib=0), GENAI, USER, llm("ep-a", 2, cpu=3.0)],
                         ids=["onnx-gpu", "onnx-genai", "ray-serve", "llm"])
def test_an_application_reads_back_from_its_serve_config_as_it_was_rendered(runs: ServeAppSpec) -> None:
    entry = serve_config.render_application(runs)
    read = serve_config.application_from_config(entry, dataclasses.replace(runs, num_replicas=9, cpu=0.25))
    assert read is not None and serve_config.render_application(read) == entry
    assert (read.num_replicas, read.cpu, read.gpus) == (runs.num_replicas, runs.cpu, runs.gpus)


@pytest.mark.parametrize(
    "edit",
    [lambda e: e["deployments"][0].update(num_replicas="auto"), lambda e: e["deployments"][0].pop("ray_actor_options"),
     lambda e: e["deployments"].append(e["deployments"][0]), lambda e: e["args"].update(sha256=5),
     lambda e: e["deployments"][0]["ray_actor_options"].update(memory=1000)],
    ids=["autoscaled-by-hand", "no-actor-options", "two-deployments", "not-a-digest", "memory-not-in-mib"],
)
def test_a_serve_config_entry_edgeplane_did_not_render_reads_as_none(edit: Any) -> None:
    entry = serve_config.render_application(onnx("ep-a"))
    edit(entry)
    assert serve_config.application_from_config(entry, onnx("ep-a")) is None


async def test_an_llm_application_an_earlier_release_rendered_is_written_once_then_scales_in_place(kube: kmock.KubernetesEmulator) -> None:
    """An earlier release put an LLM application's count inside its LLMConfig, in the args
    Ray Serve hashes as its code version: each new count restarted every engine. A control
    plane that starts writes such an entry once (its args change, so its engines restart
    that once), then leaves it as it is, and a new count then changes no code version."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    first = actuator_on(kube, SHAPE)
    try:
        assert await first.apply([llm("ep-a", 2), ONE_POD]) == {}
    finally:
        await first.close()
    stored = kube.objects[RES, NS, rayservice.rayservice_name(SITE)]
    earlier = yaml.safe_load(stored["spec"]["serveConfigV2"])
    entry = next(a for a in earlier["applications"] if a["name"] == "ep-a")
    entry["args"]["llm_configs"][0]["deployment_config"] = {"num_replicas": entry.pop("deployments")[0]["num_replicas"]}
    stored.patch({"spec": {"serveConfigV2": yaml.safe_dump(earlier)}})
    assert serve_config.configured_replicas(entry) == 2  # read back at the count it runs

    def writes() -> int:
        return sum(str(r.method) != "method.GET" for r in list(kube))

    restarted = actuator_on(kube, SHAPE)
    try:
        before = writes()
        for _ in range(3):
            assert await restarted.apply([llm("ep-a", 2), ONE_POD]) == {}
        assert writes() == before + 1
        rewritten = configured(kube)["ep-a"]
        assert rewritten == serve_config.render_application(llm("ep-a", 2))
        assert await restarted.apply([llm("ep-a", 3), ONE_POD]) == {}
        scaled = configured(kube)["ep-a"]
        assert serve_config.configured_replicas(scaled) == 3
        assert get_app_code_version(ServeApplicationSchema.model_validate(scaled)) == \
            get_app_code_version(ServeApplicationSchema.model_validate(rewritten))
    finally:
        await restarted.close()
