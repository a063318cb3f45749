"""Reading a RayService's ``status`` as KubeRay (v1.3 on) writes it into application statuses.

The objects are rendered as edgeplane sends them, and their statuses are shaped as
``rayservice_controller.go`` writes them: conditions, ``numServeEndpoints`` (left out when
0), and the applications of the active and pending Ray clusters.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from orchestrator.adapters import rayservice, rayservice_status, serve_config
from orchestrator.adapters.serve_config import ServeAppSpec, ServeAppState

SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0")
HEALTHY = {"status": "RUNNING", "serveDeploymentStatuses": {serve_config.ONNX_DEPLOYMENT: {"status": "HEALTHY"}}}


def onnx_app(replicas: int = 2) -> ServeAppSpec:
    return ServeAppSpec(name="ep-intent", route_prefix="/ep/intent", model_name="intent", runtime="onnx",
                        num_replicas=replicas, cpu=1.0, memory_mib=1024,
                        artifact_uri="https://models.example/m.onnx", sha256="b" * 64)


def condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-12-07T07:00:00Z", "observedGeneration": 1}


READY = condition("Ready", "True", "NonZeroServeEndpoints", "Number of serve endpoints is greater than 0")
NO_ENDPOINT = condition("Ready", "False", "ZeroServeEndpoints", "Number of serve endpoints dropped to 0")
NO_UPGRADE = condition("UpgradeInProgress", "False", "NoPendingCluster", "Active Ray cluster exists and no pending Ray cluster")


def read(status: dict[str, Any], replicas: int = 2) -> serve_config.ServeAppStatus:
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(replicas)], SHAPE)
    obj["status"] = status
    return rayservice_status.statuses_from_rayservice(obj, "http://svc:8000")["ep-intent"]


@pytest.mark.parametrize("endpoints", [
    {"conditions": [NO_ENDPOINT, NO_UPGRADE]},  # as KubeRay writes it: a count of 0 is left out
    {"numServeEndpoints": 0, "conditions": [NO_ENDPOINT, NO_UPGRADE]},
    {"numServeEndpoints": 0},
])
@pytest.mark.parametrize("app", [
    HEALTHY,
    {"status": "DEPLOYING", "serveDeploymentStatuses": {serve_config.ONNX_DEPLOYMENT: {"status": "UPSCALING"}}},
])
def test_an_application_behind_a_serve_service_with_no_endpoint_does_not_answer(
        endpoints: dict[str, Any], app: dict[str, Any]) -> None:
    status = read({**endpoints, "activeServiceStatus": {
        "rayClusterName": "edgeplane-paris-dc-abc12", "applicationStatuses": {"ep-intent": app}}})
    assert (status.status, status.replicas_running, status.answers) == (ServeAppState.UNHEALTHY, 0, False)
    assert status.message == ("the Serve service edgeplane-paris-dc-serve-svc has no ready endpoint: no Serve proxy "
                              "passes its health check" + (" (Number of serve endpoints dropped to 0)" if "conditions" in endpoints else ""))


@pytest.mark.parametrize("endpoints", [
    {"numServeEndpoints": 2, "conditions": [READY, NO_UPGRADE]},
    {},  # a KubeRay that reports neither
])
def test_an_application_behind_a_serve_service_with_endpoints_answers(endpoints: dict[str, Any]) -> None:
    status = read({**endpoints, "activeServiceStatus": {
        "rayClusterName": "edgeplane-paris-dc-abc12", "applicationStatuses": {"ep-intent": HEALTHY}}})
    assert (status.status, status.replicas_running, status.answers) == (ServeAppState.RUNNING, 2, True)


def test_a_failed_application_keeps_its_own_error_when_no_endpoint_is_ready() -> None:
    failed = {"status": "DEPLOY_FAILED", "message": "ValueError: bad model", "serveDeploymentStatuses": {}}
    status = read({"conditions": [NO_ENDPOINT, NO_UPGRADE], "activeServiceStatus": {
        "rayClusterName": "edgeplane-paris-dc-abc12", "applicationStatuses": {"ep-intent": failed}}})
    assert (status.status, status.message) == (ServeAppState.DEPLOY_FAILED, "ValueError: bad model")


def behind(status: dict[str, Any], replicas: int, generation: int) -> serve_config.ServeAppStatus:
    """``status`` read for an object whose spec (``replicas``) is of ``generation``."""
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(replicas)], SHAPE)
    obj["metadata"]["generation"] = generation
    obj["status"] = status
    return rayservice_status.statuses_from_rayservice(obj, "http://svc:8000")["ep-intent"]


SERVING_GENERATION_1 = {
    "observedGeneration": 1, "numServeEndpoints": 1, "conditions": [READY, NO_UPGRADE],
    "activeServiceStatus": {"rayClusterName": "edgeplane-paris-dc-abc12", "applicationStatuses": {"ep-intent": HEALTHY}},
}


def test_a_status_of_an_older_spec_counts_one_replica_of_a_new_target() -> None:
    """Scaled 1 -> 3 while KubeRay has not caught up: what runs is the one replica of the
    spec it last reconciled, not the three of the spec it has not."""
    status = behind(SERVING_GENERATION_1, replicas=3, generation=2)
    assert (status.status, status.replicas_running, status.replicas_target, status.answers) == (
        ServeAppState.RUNNING, 1, 3, True)
    assert status.message.startswith("KubeRay has not reconciled generation 2 of the RayService yet")


def test_a_status_of_the_spec_as_it_is_counts_the_target() -> None:
    status = behind({**SERVING_GENERATION_1, "observedGeneration": 2}, replicas=3, generation=2)
    assert (status.status, status.replicas_running, status.message) == (ServeAppState.RUNNING, 3, "")


INITIALIZING = [condition("Ready", "False", "Initializing", "RayService is initializing"),
                condition("UpgradeInProgress", "False", "Initializing", "RayService is initializing")]
IMPORT_FAILED = {"status": "DEPLOY_FAILED", "serveDeploymentStatuses": {},
                 "message": "Traceback (most recent call last):\n  File \"x\"\nModuleNotFoundError: No module named 'llm_service'"}


@pytest.mark.parametrize(("app", "state", "message"), [
    (IMPORT_FAILED, ServeAppState.DEPLOY_FAILED, "ModuleNotFoundError: No module named 'llm_service'"),
    ({"status": "DEPLOYING", "serveDeploymentStatuses": {serve_config.ONNX_DEPLOYMENT: {
        "status": "UPDATING", "message": "Deployment is waiting for resources"}}},
     ServeAppState.DEPLOYING, "OnnxModel: Deployment is waiting for resources"),
    # Running on a cluster KubeRay has not switched the Serve service to: not answering yet.
    (HEALTHY, ServeAppState.DEPLOYING,
     "starting on Ray cluster edgeplane-paris-dc-abc12; KubeRay sends it traffic once every application runs there"),
])
def test_an_application_on_a_sites_first_cluster_reads_as_its_pending_cluster_reports_it(
        app: dict[str, Any], state: ServeAppState, message: str) -> None:
    status = read({"conditions": INITIALIZING, "activeServiceStatus": {}, "pendingServiceStatus": {
        "rayClusterName": "edgeplane-paris-dc-abc12", "applicationStatuses": {"ep-intent": app}}})
    assert (status.status, status.message, status.replicas_running, status.answers) == (state, message, 0, False)


def test_an_application_on_a_sites_first_cluster_names_the_failed_one_kuberay_waits_on() -> None:
    """KubeRay sends a site's first cluster traffic only once every application runs there:
    one failed holds the others, which said they were starting, with no word of why they never did."""
    bad = ServeAppSpec(name="ep-bad", route_prefix="/ep/bad", model_name="bad", runtime="ray-serve", num_replicas=1,
                       import_path="llm_service.app:build")
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(), bad], SHAPE)
    obj["status"] = {"conditions": INITIALIZING, "activeServiceStatus": {}, "pendingServiceStatus": {
        "rayClusterName": "edgeplane-paris-dc-abc12", "applicationStatuses": {"ep-intent": HEALTHY, "ep-bad": IMPORT_FAILED}}}
    statuses = rayservice_status.statuses_from_rayservice(obj, "http://svc:8000")
    assert (statuses["ep-bad"].status, statuses["ep-bad"].message) == (
        ServeAppState.DEPLOY_FAILED, "ModuleNotFoundError: No module named 'llm_service'")
    intent = statuses["ep-intent"]
    assert (intent.status, intent.replicas_running, intent.message) == (
        ServeAppState.DEPLOYING, 0, "starting on Ray cluster edgeplane-paris-dc-abc12; KubeRay sends it traffic once every "
        "application runs there, and ep-bad (DEPLOY_FAILED) failed there: it answers once that one runs or is removed")


def test_an_application_not_reported_on_any_cluster_says_what_kuberay_waits_for() -> None:
    status = read({"conditions": INITIALIZING})
    assert (status.status, status.message, status.replicas_running) == (
        ServeAppState.NOT_STARTED, "RayService is initializing", 0)


ACTIVE, NEW = "edgeplane-paris-dc-abc12", "edgeplane-paris-dc-xyz89"
UPGRADING = [READY, condition("UpgradeInProgress", "True", "BothActivePendingClustersExist",
                              "Both active and pending Ray clusters exist")]


def upgrading(pending_apps: dict[str, Any]) -> dict[str, Any]:
    """What KubeRay writes while it builds a new cluster: the active one's applications left out."""
    return {"observedGeneration": 2, "numServeEndpoints": 2, "conditions": UPGRADING,
            "activeServiceStatus": {"rayClusterName": ACTIVE},
            "pendingServiceStatus": {"rayClusterName": NEW, "applicationStatuses": pending_apps}}


def serving(replicas: int) -> rayservice_status.ActiveApplications:
    return rayservice_status.ActiveApplications(ACTIVE, {"ep-intent": read({
        "numServeEndpoints": 2, "conditions": [READY, NO_UPGRADE],
        "activeServiceStatus": {"rayClusterName": ACTIVE, "applicationStatuses": {"ep-intent": HEALTHY}}}, replicas)})


def read_upgrading(status: dict[str, Any], kept: rayservice_status.ActiveApplications | None, replicas: int = 2) -> serve_config.ServeAppStatus:
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(replicas)], SHAPE)
    obj["status"] = status
    return rayservice_status.statuses_from_rayservice(obj, "http://svc:8000", kept=kept)["ep-intent"]


UPDATING = {"status": "DEPLOYING", "serveDeploymentStatuses": {serve_config.ONNX_DEPLOYMENT: {"status": "UPDATING"}}}


@pytest.mark.parametrize(("before", "now", "running"), [(2, 2, 2), (2, 3, 2), (3, 1, 1)])
def test_an_application_answers_from_the_active_cluster_while_a_new_one_is_built(before: int, now: int, running: int) -> None:
    """The active cluster runs the config it had until the switch: its count stands, within the target now."""
    status = read_upgrading(upgrading({"ep-intent": UPDATING}), serving(before), now)
    assert (status.status, status.replicas_running, status.replicas_target, status.answers) == (
        ServeAppState.RUNNING, running, now, True)


def test_a_failure_on_the_new_cluster_is_told_while_the_active_one_answers() -> None:
    status = read_upgrading(upgrading({"ep-intent": IMPORT_FAILED}), serving(2))
    assert (status.status, status.replicas_running, status.answers) == (ServeAppState.RUNNING, 2, True)
    assert status.message == (f"DEPLOY_FAILED on the new Ray cluster {NEW}, which KubeRay switches to once every "
                              "application runs there: ModuleNotFoundError: No module named 'llm_service'")


@pytest.mark.parametrize(("status", "kept"), [
    (upgrading({"ep-intent": UPDATING}), None),  # nothing read before the upgrade (a restarted control plane)
    (upgrading({"ep-intent": UPDATING}), rayservice_status.ActiveApplications("edgeplane-paris-dc-old01", serving(2).statuses)),
    # an application the upgrade adds: only the new cluster has it
    (upgrading({"ep-intent": UPDATING}), rayservice_status.ActiveApplications(ACTIVE, {})),
])
def test_an_application_not_read_on_the_active_cluster_waits_for_the_new_one(
        status: dict[str, Any], kept: rayservice_status.ActiveApplications | None) -> None:
    waiting = read_upgrading(status, kept)
    assert (waiting.status, waiting.replicas_running, waiting.answers) == (ServeAppState.DEPLOYING, 0, False)


def test_no_serve_endpoint_during_an_upgrade_means_no_application_answers() -> None:
    status = {**upgrading({"ep-intent": UPDATING}), "numServeEndpoints": 0, "conditions": [NO_ENDPOINT, UPGRADING[1]]}
    assert read_upgrading(status, serving(2)).answers is False


def test_the_active_clusters_applications_are_kept_through_an_upgrade_and_replaced_after_the_switch() -> None:
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(2)], SHAPE)
    kept = serving(2)
    obj["status"] = upgrading({"ep-intent": UPDATING})
    assert rayservice_status.keep_active(obj, {}, kept) is kept
    # the new cluster promoted: its own applications are kept from now on
    obj["status"] = {"numServeEndpoints": 2, "conditions": [READY, NO_UPGRADE],
                     "activeServiceStatus": {"rayClusterName": NEW, "applicationStatuses": {"ep-intent": HEALTHY}}}
    statuses = rayservice_status.statuses_from_rayservice(obj, "http://svc:8000", kept=kept)
    assert rayservice_status.keep_active(obj, statuses, kept) == rayservice_status.ActiveApplications(NEW, statuses)


def test_a_status_of_an_older_spec_leaves_what_was_kept_of_the_same_cluster() -> None:
    """Its count is cut to one while the cluster still runs what it ran: an upgrade that
    follows stands in with the count read before."""
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(3)], SHAPE)
    obj["metadata"]["generation"] = 2
    obj["status"] = {**SERVING_GENERATION_1, "activeServiceStatus": {
        "rayClusterName": ACTIVE, "applicationStatuses": {"ep-intent": HEALTHY}}}
    kept = serving(2)
    statuses = rayservice_status.statuses_from_rayservice(obj, "http://svc:8000", kept=kept)
    assert statuses["ep-intent"].replicas_running == 1
    assert rayservice_status.keep_active(obj, statuses, kept) is kept


@pytest.mark.parametrize(("deployment", "target"), [
    ({"name": "OnnxModel", "num_replicas": "auto"}, 1),  # Serve's autoscaling, from its default start
    ({"name": "OnnxModel", "num_replicas": "auto", "autoscaling_config": {"min_replicas": 2, "max_replicas": 5}}, 2),
    ({"name": "OnnxModel", "num_replicas": "auto", "autoscaling_config": {"initial_replicas": 3, "min_replicas": 1}}, 3),
    ({"name": "OnnxModel", "num_replicas": "three"}, 0),
    ("OnnxModel", 0),
])
def test_a_hand_edited_replica_count_is_read_not_raised(deployment: Any, target: int) -> None:
    """The serve config is read back from the cluster, where anyone may have edited it: a
    count Serve scales itself reads as where it starts, one that is no count as none."""
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(2)], SHAPE)
    obj["spec"]["serveConfigV2"] = yaml.safe_dump({"applications": [
        {"name": "ep-intent", "route_prefix": "/ep/intent", "import_path": "orchestrator.serving.onnx_app:build",
         "deployments": [deployment]}]})
    obj["status"] = {"activeServiceStatus": {"rayClusterName": ACTIVE, "applicationStatuses": {"ep-intent": HEALTHY}}}
    status = rayservice_status.statuses_from_rayservice(obj, "http://svc:8000")["ep-intent"]
    assert (status.status, status.replicas_target, status.replicas_running) == (ServeAppState.RUNNING, target, target)


@pytest.mark.parametrize("status", [
    SERVING_GENERATION_1,
    {"conditions": [NO_ENDPOINT, NO_UPGRADE], "activeServiceStatus": {
        "rayClusterName": ACTIVE, "applicationStatuses": {"ep-intent": HEALTHY}}},
    {"conditions": INITIALIZING, "pendingServiceStatus": {
        "rayClusterName": ACTIVE, "applicationStatuses": {"ep-intent": IMPORT_FAILED}}},
    upgrading({"ep-intent": UPDATING}),
])
def test_the_statuses_read_here_are_ones_the_crd_admits(rayservice_validator: Any, status: dict[str, Any]) -> None:
    obj = rayservice.render_rayservice("paris-dc", "edge-dc", [onnx_app(2)], SHAPE)
    rayservice_validator.validate({**obj, "status": status})


def _tried(reason: str, message: str = "", on: str = "edgeplane-dc-1", **times: Any) -> dict[str, Any]:
    return {"reason": reason, "message": message, "involvedObject": {"kind": "RayService", "name": on}, **times}


FAILED, APPLIED = rayservice_status.SERVE_CONFIG_FAILED, rayservice_status.SERVE_CONFIG_APPLIED


@pytest.mark.parametrize(("events", "said"), [
    ([], ""),
    ([_tried(FAILED, "no", lastTimestamp="2026-01-01T10:00:00Z")], "no"),
    ([_tried(FAILED, "no", lastTimestamp="2026-01-01T10:00:00Z"), _tried(APPLIED, lastTimestamp="2026-01-01T10:00:01Z")], ""),
    ([_tried(APPLIED, lastTimestamp="2026-01-01T10:00:00Z"), _tried(FAILED, "no", lastTimestamp="2026-01-01T10:00:01Z")], "no"),
    # an events.k8s.io Event, read through core/v1: its series, else its eventTime, says when
    ([_tried(APPLIED, lastTimestamp="2026-01-01T10:00:02Z"),
      _tried(FAILED, "no", eventTime="2026-01-01T10:00:00.000001Z", series={"lastObservedTime": "2026-01-01T10:00:03.5Z"})], "no"),
    ([_tried(APPLIED, eventTime="2026-01-01T10:00:02.100000Z"), _tried(FAILED, "no", eventTime="2026-01-01T10:00:02.000000Z")], ""),
    ([_tried(FAILED, "another RayService's", on="edgeplane-dc-2", lastTimestamp="2026-01-01T10:00:00Z")], ""),
    ([_tried("UpdatedHeadPodServeLabel", "not a try", lastTimestamp="2026-01-01T10:00:00Z")], ""),
    ([_tried(FAILED, lastTimestamp="not a time")], FAILED),
])
def test_why_kuberay_could_not_apply_the_serve_config_is_its_last_try_that_failed(events: list[dict[str, Any]], said: str) -> None:
    assert rayservice_status.serve_config_refusal(events, "edgeplane-dc-1") == said
