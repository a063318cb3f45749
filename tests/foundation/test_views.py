"""Read models computed from a reconcile snapshot of the example fleet: numbers a person reads."""

from __future__ import annotations

import dataclasses
import re

import pytest

from orchestrator import views
from orchestrator.adapters import serve_config
from orchestrator.agents import model as agent_model
from orchestrator.cli import status as status_cli
from orchestrator.manifests import loader, schema
from orchestrator.reconciler import applications, autoscaler, planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.store import sqlite as store_mod

from . import support


def example_snapshot(docs: list[loader.LoadedDocument]) -> snap.Snapshot:
    """The examples applied, both data centres reachable and empty, no agent yet."""
    sites = tuple(snap.SiteRecord(d.name, dict(d.doc.metadata.labels), d.doc.spec) for d in docs if isinstance(d.doc, schema.SiteDoc))
    return snap.Snapshot(
        sites=sites,
        models={d.name: d.doc.spec for d in docs if isinstance(d.doc, schema.ModelDoc)},
        deployments=tuple(snap.DeploymentRecord(d.name, 1, d.doc.spec) for d in docs if isinstance(d.doc, schema.ModelDeploymentDoc)),
        placements=(), agents=(),
        datacentres={s.name: snap.DataCentreObservation(True) for s in sites if s.spec.tier == "datacenter"},
        artifacts={}, assignments={}, applied_apps={},
    )


def examples() -> list[loader.LoadedDocument]:
    files = loader.manifest_files(support.EXAMPLES)
    return loader.load_text(loader.bundle([(str(f), f.read_text()) for f in files]))


def test_predicted_latencies_are_rounded_in_describe_and_plan() -> None:
    docs = examples()
    s = example_snapshot(docs)
    described = views.describe_deployment(planning.plan_pass(s), "doc-fields-fr")
    latencies = [x["ms"] for x in described["placement"]["latency"]]
    assert latencies and all(ms is not None for ms in latencies), described
    previewed = [x["ms"] for x in views.preview(s, docs)["latency"] if x["ms"] is not None]
    assert previewed
    for ms in latencies + previewed:
        assert re.fullmatch(r"\d+(\.\d)?", repr(ms)), ms


def test_plan_shows_the_gpu_memory_a_generative_replica_needs_when_none_is_declared() -> None:
    docs = examples()
    (large,) = [v for d in docs if isinstance(d.doc, schema.ModelDoc) and d.name == "assistant"
                for v in d.doc.spec.variants if v.name == "large"]
    assert large.resources.gpus == 1 and large.resources.gpuMemoryGiB == 0 and large.generative is not None
    (change,) = [c for c in views.preview(example_snapshot(docs), docs)["changes"] if c["deployment"] == "assistant-dc"]
    g = large.generative
    need = g.weightBytes + g.kvBytesPerToken * g.contextLength * g.maxConcurrentSequences
    assert change["gpusPerReplica"] == 1 and change["gpuMemoryGiBPerGpu"] == round(need / 2**30, 2) > 0, change


def _with_eu_south(rps: int) -> list[loader.LoadedDocument]:
    files = loader.manifest_files(support.EXAMPLES)
    texts = [(str(f), f.read_text().replace("{region: eu-south, rps: 150}", f"{{region: eu-south, rps: {rps}}}")) for f in files]
    return loader.load_text(loader.bundle(texts))


@pytest.mark.parametrize(("eu_south_rps", "autoscaled", "expected"), [
    # intent-eu: demand 300 + 250 + eu-south rps, slowest variant 150 rps per replica, replicas [2, 6]
    (150, None, "5 replica(s): ceil(700 rps / 150 rps per replica) = 5, within replicas [2, 6]"),
    (900, None, "6 replica(s): ceil(1450 rps / 150 rps per replica) = 10, capped to 6 by replicas [2, 6]"),
    (0, None, "4 replica(s): ceil(550 rps / 150 rps per replica) = 4, within replicas [2, 6]"),
    (900, 5, "5 replica(s): autoscaler's count from observed load = 5, within replicas [2, 6];"
             " declared demand (1450 rps) is not used while the autoscaler has a count"),
    (900, 1, "2 replica(s): autoscaler's count from observed load = 1, raised to 2 by replicas [2, 6];"
             " declared demand (1450 rps) is not used while the autoscaler has a count"),
    (150, 9, "6 replica(s): autoscaler's count from observed load = 9, capped to 6 by replicas [2, 6];"
             " declared demand (700 rps) is not used while the autoscaler has a count"),
])
def test_the_count_reason_adds_up(eu_south_rps: int, autoscaled: int | None, expected: str) -> None:
    docs = _with_eu_south(eu_south_rps)
    s = example_snapshot(docs)
    if autoscaled is not None:
        s = dataclasses.replace(s, autoscale={"intent-eu": autoscaler.Recommendation(autoscaled, "inflight", 8.0, 2)})
    plan = planning.plan_pass(s).result.deployments["intent-eu"]
    assert plan.reason == expected
    assert plan.reason.startswith(f"{plan.placed} replica(s)")
    previewed = {d["name"]: d for d in views.preview(s, docs)["deployments"]}["intent-eu"]
    assert previewed["reason"] == expected and previewed["replicas"] == plan.placed


@pytest.mark.parametrize(("autoscaling", "expected"), [
    ("", "5 replica(s): ceil(700 rps / 150 rps per replica) = 5, within replicas [2, 6]"),
    ("  autoscaling: {targetInflight: 8}\n", "2 replica(s): autoscaler's count from observed load = 2, within replicas [2, 6];"
                                             " declared demand (700 rps) is not used while the autoscaler has a count"),
])
def test_plan_of_an_edit_to_autoscaling_wants_what_the_next_pass_places(autoscaling: str, expected: str) -> None:
    """The autoscaler last counted 2 for intent-eu. With spec.autoscaling removed, the next
    pass has no count for it (the autoscaler evaluates autoscaled specs only) and sizes it
    from its demand: so must the plan. Kept, the count stands."""
    s = dataclasses.replace(example_snapshot(examples()),
                            autoscale={"intent-eu": autoscaler.Recommendation(2, "inflight", 8.0, 2, reporting=2, per_replica=1.0)})
    files = loader.manifest_files(support.EXAMPLES)
    edited = [d for d in loader.load_text(loader.bundle([
        (str(f), f.read_text().replace("  autoscaling: {targetInflight: 8}\n", autoscaling)) for f in files]))
        if d.name == "intent-eu"]
    planned = {d["name"]: d for d in views.preview(s, edited)["deployments"]}["intent-eu"]
    assert planned["reason"] == expected


def status_waiting(placements: list[dict[str, object]]) -> dict[str, list[str]]:
    """What ``edgeplane status`` shows under ``waiting`` for these placements. Through the
    command's private step: the command reads them over the API, and this test has none."""
    return status_cli._waiting(placements)


def test_a_waiting_replica_says_why_in_placements_and_status() -> None:
    docs = examples()
    waiting = "Deployment 'full' has 1 replica that cannot be scheduled: resources {'GPU': 1.0} not available"
    app = serve_config.ServeAppStatus(applications.app_name("dc-paris", "assistant", "full"), serve_config.ServeAppState.DEPLOYING, waiting, 0, 1, None)
    s = dataclasses.replace(example_snapshot(docs), datacentres={
        "dc-paris": snap.DataCentreObservation(True, {app.name: app}),
        "dc-frankfurt": snap.DataCentreObservation(False, error="connection refused"),
    })
    rows = [store_mod.PlacementRow("assistant", "dc-paris", "full", 1), store_mod.PlacementRow("intent-eu", "dc-frankfurt", "full", 2),
            store_mod.PlacementRow("intent-eu", "edge-lyon", "distilled", 1)]
    items = {(p["deployment"], p["site"]): p for p in views.placements(s, rows)["items"]}
    assert items[("assistant", "dc-paris")] == {"deployment": "assistant", "site": "dc-paris", "variant": "full", "replicas": 1,
                                                "state": "DEPLOYING", "ready": 0, "reason": waiting}
    assert items[("intent-eu", "dc-frankfurt")]["reason"] == "connection refused"
    assert items[("intent-eu", "edge-lyon")]["reason"] == "no edge agent has joined this site"
    assert status_waiting(list(items.values())) == {
        "assistant": [f"dc-paris: {waiting}"],
        "intent-eu": ["dc-frankfurt: connection refused", "edge-lyon: no edge agent has joined this site"],
    }


def test_a_second_deployment_of_a_model_the_agent_serves_for_another_is_a_conflict_not_ready() -> None:
    """An agent serves a model once, under its Model name, for the first deployment by name
    that places it there; another deployment of that model on the same site is sent nothing.
    Its replica was shown READY (the agent served the model, for the other deployment)."""
    s = example_snapshot(examples())
    first = next(d for d in s.deployments if d.name == "intent-eu")
    second = dataclasses.replace(first, name="intent-eu-full")
    sha = "35831637b80bdd36f96771ab77bf514a108f89a6d67ea078d044bfcc8b228703"
    state = agent_model.ModelState("intent-classifier", sha, agent_model.ModelPhase.READY, serving_sha256=sha, deployment=first.name,
                                   variant="distilled")
    agent = agent_model.AgentStatus("edge-lyon", "agt-1", "http://127.0.0.1:9", True, 0.0, 0.0, agent_model.Location("FR", "", None, None),
                                    {}, "test", agent_model.Capacity(8, 32 << 30, (), ("CPUExecutionProvider",)), ("CPUExecutionProvider",),
                                    0, 0.0, 16 << 30, {"intent-classifier": state}, 0, 0.5)
    s = dataclasses.replace(s, deployments=(*s.deployments, second), agents=(agent,))
    rows = [store_mod.PlacementRow(first.name, "edge-lyon", "distilled", 1), store_mod.PlacementRow(second.name, "edge-lyon", "full", 1)]
    shown = {item["deployment"]: item for item in views.placements(s, rows)["items"]}
    assert (shown[first.name]["state"], shown[first.name]["ready"]) == ("READY", 1)
    assert (shown[second.name]["state"], shown[second.name]["ready"]) == ("Conflict", 0)
    assert f"for deployment {first.name}" in shown[second.name]["reason"]
    assert [planning.row_ready(s, r, "intent-classifier") for r in rows] == [1, 0]


@pytest.mark.parametrize("sent", [False, True])
def test_a_deployment_taking_over_a_deleted_ones_model_on_an_agent_is_no_conflict(sent: bool) -> None:
    """intent-eu is deleted and intent-eu-next, of the same model, applied in one change: its
    replica takes the agent's model over. Until the agent's next heartbeat names the new
    deployment, the agent serves the model for the deleted one, which holds no site any
    more: no Conflict. Once the new deployment's assignment is sent (the very bytes the agent
    serves), the replica answers for it."""
    s = example_snapshot(examples())
    old = next(d for d in s.deployments if d.name == "intent-eu")
    new = dataclasses.replace(old, name="intent-eu-next")
    sha = "35831637b80bdd36f96771ab77bf514a108f89a6d67ea078d044bfcc8b228703"
    state = agent_model.ModelState("intent-classifier", sha, agent_model.ModelPhase.READY, serving_sha256=sha, deployment=old.name,
                                   variant="distilled")
    agent = agent_model.AgentStatus("edge-lyon", "agt-1", "http://127.0.0.1:9", True, 0.0, 0.0, agent_model.Location("FR", "", None, None),
                                    {}, "test", agent_model.Capacity(8, 32 << 30, (), ("CPUExecutionProvider",)), ("CPUExecutionProvider",),
                                    0, 0.0, 16 << 30, {"intent-classifier": state}, 0, 0.5)
    rows = (store_mod.PlacementRow(new.name, "edge-lyon", "distilled", 1),)
    assignment = agent_model.Assignment("intent-classifier", new.name, "distilled", "http://cp/a", sha)
    s = dataclasses.replace(s, deployments=tuple(new if d.name == old.name else d for d in s.deployments), agents=(agent,),
                            placements=rows, assignments={"edge-lyon": (assignment,)} if sent else {})
    (shown,) = views.placements(s, rows)["items"]
    assert shown["state"] != "Conflict", shown
    if sent:
        assert (shown["state"], shown["ready"]) == ("READY", 1), shown
    else:
        assert (shown["state"], shown["ready"]) == ("Assigned", 0), shown
        assert f"for deployment {old.name}" in shown["reason"], shown


def test_a_replica_on_a_site_awaited_after_a_restart_is_rejoining_not_without_agent() -> None:
    s = example_snapshot(examples())
    rows = [store_mod.PlacementRow("intent-eu", "edge-lyon", "distilled", 1)]
    (lost,) = views.placements(s, rows)["items"]
    (awaited,) = views.placements(dataclasses.replace(s, rejoining=frozenset({"edge-lyon"})), rows)["items"]
    assert (lost["state"], awaited["state"], awaited["ready"]) == ("NoAgent", "Rejoining", 0)


def _lines_run_previewing(deployments: int) -> int:
    """The lines of :mod:`orchestrator.views` run to preview a fleet of ``deployments``
    deployments with one replica each, none of them changed."""
    docs = loader.load_text(support.join(
        support.doc("Site", "edge-0", {"tier": "edge", "location": {"country": "FR", "lat": 48.0, "lon": 2.0}}),
        support.doc("Model", "m", {"variants": [{"name": "v", "runtime": "onnx", "artifact": {"uri": "v.onnx", "sha256": "0" * 64},
                                                 "resources": {"cpu": 0.1, "memoryMiB": 64}}]}),
        *(support.doc("ModelDeployment", f"d{i:04d}", {"model": "m", "replicas": {"min": 1, "max": 1}}) for i in range(deployments))))
    s = dataclasses.replace(example_snapshot(docs), placements=tuple(
        store_mod.PlacementRow(f"d{i:04d}", "edge-0", "v", 1) for i in range(deployments)))

    def preview() -> None:
        assert len(views.preview(s, [])["changes"]) == deployments

    return support.lines_run(views, preview)


def test_a_preview_finds_each_placement_rows_deployment_without_scanning_them_all() -> None:
    few, many = _lines_run_previewing(20), _lines_run_previewing(200)
    assert many <= 12 * few  # ten times the rows and deployments: about ten times the work, not a hundred
