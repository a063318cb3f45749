"""KubeRayActuator over real HTTP against a stateful Kubernetes API emulator (kmock).

kmock's gaps, and how these tests live with them: its POST answers without the created
object (so the actuator never relies on create's answer), it keeps no resourceVersion (the
actuator decides on its spec-hash annotation instead) and it has no namespaces (none are
created). Status is written into the stored object directly, as the operator would.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from rayservice_apps import GPU_APP, LLM_SHAPE, LONG, NS, SHAPE, USER_APP, app, llm_app

from orchestrator import ports
from orchestrator.adapters import kuberay, rayservice, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec, ServeAppState

RES = kmock.resource("ray.io", "v1", "rayservices")


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


KUBECONFIG = {
    "apiVersion": "v1", "kind": "Config", "current-context": "eks",
    "clusters": [{"name": "c", "cluster": {"server": "https://k.example"}}],
    "users": [{"name": "eks", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "/usr/local/bin/aws",
                                                "args": ["eks", "get-token"]}}},
              {"name": "legacy", "user": {"auth-provider": {"name": "gcp", "config": {"cmd-path": "/opt/sdk/bin/gcloud config config-helper"}}}},
              {"name": "token", "user": {"token": "t"}}],
    "contexts": [{"name": n, "context": {"cluster": "c", "user": n}} for n in ("eks", "legacy", "token")]
                + [{"name": "nobody", "context": {"cluster": "c"}}],
}


@pytest.mark.parametrize(("context", "command"), [
    (None, "aws"),  # the current context
    ("eks", "aws"),
    ("legacy", "gcloud"),
    ("token", None),
    ("nobody", None),
    ("unknown", None),
    (kuberay.IN_CLUSTER, None),
])
def test_the_credential_command_a_context_runs_is_named_by_its_file_name(tmp_path: pathlib.Path, context: str | None,
                                                                          command: str | None) -> None:
    (tmp_path / "config").write_text(yaml.safe_dump(KUBECONFIG))
    assert kuberay.credential_command(context, str(tmp_path / "config")) == command


def test_no_credential_command_is_named_from_a_kubeconfig_that_cannot_be_read(tmp_path: pathlib.Path) -> None:
    assert kuberay.credential_command("eks", str(tmp_path / "missing")) is None
    (tmp_path / "broken").write_text("users: [unclosed")
    assert kuberay.credential_command("eks", str(tmp_path / "broken")) is None


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


EVENTS = kmock.resource("", "v1", "events")
#: What KubeRay's Event says when Ray Serve refused the Serve config (its API answered 400).
REFUSED = ("Failed to update serve applications to the RayCluster edge-dc/edgeplane-paris-dc-abc12: UpdateDeployments fail: "
           "400 Bad Request Unexpected error occurred while applying config: 1 validation error for ServeDeploySchema")


def _event(kube: kmock.KubernetesEmulator, name: str, reason: str, at: str, message: str, on: str = "edgeplane-paris-dc") -> None:
    """An Event on the RayService ``on`` as KubeRay's recorder writes one."""
    kube.objects[EVENTS, NS, name] = {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": NS},
        "involvedObject": {"apiVersion": "ray.io/v1", "kind": "RayService", "name": on, "namespace": NS},
        "reason": reason, "message": message, "type": "Warning" if reason.startswith("Failed") else "Normal",
        "firstTimestamp": at, "lastTimestamp": at, "count": 1, "source": {"component": "rayservice-controller"}}


async def test_a_serve_config_kuberay_could_not_apply_is_said_in_its_applications_status(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    """KubeRay writes why Ray Serve refused the Serve config only in an Event on the RayService."""
    await actuator.apply([app("ep-intent")])
    _event(kube, "a", "UpdatedServeApplications", "2026-12-07T07:00:00Z", "Updated serve applications")
    _event(kube, "b", "FailedToUpdateServeApplications", "2026-12-07T07:05:00Z", REFUSED)
    _event(kube, "c", "FailedToUpdateServeApplications", "2026-12-07T07:09:00Z", "another site's", on="edgeplane-lyon-dc")
    (pending,) = (await actuator.observe()).values()
    assert pending.status is ServeAppState.NOT_STARTED
    assert f"KubeRay could not apply the Serve config: {REFUSED}" in pending.detail, pending
    assert "KubeRay could not apply the Serve config" in pending.message

    _event(kube, "d", "UpdatedServeApplications", "2026-12-07T07:10:00Z", "Updated serve applications")
    (pending,) = (await actuator.observe()).values()
    assert "could not apply" not in pending.detail, pending


async def test_events_this_control_plane_may_not_list_leave_its_applications_status_as_it_was(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator
) -> None:
    await actuator.apply([app("ep-intent")])
    _event(kube, "b", "FailedToUpdateServeApplications", "2026-12-07T07:05:00Z", REFUSED)
    kube[lambda request: request.resource == EVENTS] << 403
    (pending,) = (await actuator.observe()).values()
    assert (pending.status, pending.detail) == (ServeAppState.NOT_STARTED, "the RayService has not reported this application yet")


async def test_events_not_listed_for_another_reason_do_not_say_a_permission_is_missing(
    kube: kmock.KubernetesEmulator, actuator: kuberay.KubeRayActuator, caplog: pytest.LogCaptureFixture
) -> None:
    """A list of the Events that fails at one pass (the API server's 500, a call past its
    bound) is no missing permission, and does not hide the one a later 403 says is missing."""
    await actuator.apply([app("ep-intent")])
    answer = [500]
    kube[lambda request: request.resource == EVENTS and answer[0] == 500] << 500
    kube[lambda request: request.resource == EVENTS and answer[0] == 403] << 403
    with caplog.at_level(logging.INFO, logger=kuberay.__name__):
        (pending,) = (await actuator.observe()).values()
        assert pending.status is ServeAppState.NOT_STARTED
        assert "HTTP 500" in caplog.text and "needs list on events" not in caplog.text, caplog.text
        answer[0] = 403
        await actuator.observe()
        assert "needs list on events" in caplog.text, caplog.text
