"""Read models computed from a reconcile snapshot of the example fleet: numbers a person reads."""

from __future__ import annotations

import re

from orchestrator import views
from orchestrator.manifests import loader, schema
from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap

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
