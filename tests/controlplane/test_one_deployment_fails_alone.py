"""A deployment whose Serve application cannot be rendered fails alone.

A ray-serve variant stored by an earlier version with an import path the Serve adapter
refuses (``pkgapp``: apply refuses it now, a store keeps it) raised inside planning, and
every reconcile pass failed ("reconcile pass failed; retrying in 16.0s"): no deployment of
the fleet was placed, sent or applied any more. Now that deployment alone is not applied:
its status says why on one line, an event says it once, and every other one is reconciled
as ever. The control plane is the real one (HTTP API, SQLite store, its reconcile loop);
the data centre is a cluster stand-in that runs what it is applied.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from tests.controlplane.datacentres import MODEL, Cluster, bundle, deployment, site, start

#: A Model and its deployment as an earlier version stored them: an import path this one refuses at apply.
LEGACY_MODEL = {"variants": [{"name": "v", "runtime": "ray-serve", "importPath": "pkgapp", "resources": {"cpu": 1, "memoryMiB": 256}}]}
LEGACY_DEPLOYMENT = {"model": "old", "replicas": {"min": 1, "max": 1}, "placement": {"tiers": ["datacenter"], "siteSelector": {"site": "dc-1"}}}


def status(cp: object, name: str) -> dict[str, object]:
    stored = cp.store.get("ModelDeployment", name)  # type: ignore[attr-defined]
    return dict(stored.status) if stored is not None else {}


async def test_a_deployment_whose_serve_application_cannot_be_rendered_fails_alone(
        fleet: harness.Fleet, caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    cp.store.apply([store_mod.ObjectWrite("Model", "old", {}, LEGACY_MODEL),
                    store_mod.ObjectWrite("ModelDeployment", "d-old", {}, LEGACY_DEPLOYMENT)],
                   store_mod.Event("earlier-version", "apply", "", "", "apply"))
    with caplog.at_level(logging.WARNING):
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            applied = await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1")))
            assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: any(a.model_name == "m" for a in cluster.running.values()), 30, what="d's application on dc-1")
        await harness.wait_until(lambda: status(cp, "d").get("phase") == "Running", 30, what="d Running")
        await harness.wait_until(lambda: status(cp, "d-old").get("phase") == "Failing", 30, what="d-old Failing")
        passes = cp.reconciler.passes
        await cp.reconciler.wait_for_pass(passes + 2)  # more passes: still one event, and d-old still not applied

    assert [a.model_name for a in cluster.running.values()] == ["m"]
    why = str(status(cp, "d-old")["reason"])
    assert "\n" not in why and "dc-1: not applied: import_path 'pkgapp' is not one Ray Serve takes" in why, why
    events = [e for e in cp.store.events(kind="ModelDeployment", name="d-old", limit=1000) if e.action == "serve-app-invalid"]
    assert len(events) == 1 and "pkgapp" in events[0].reason, events
    failed = [r.getMessage() for r in caplog.records if "reconcile pass failed" in r.getMessage()]
    assert failed == [], failed
    said = [r.getMessage() for r in caplog.records if r.name == loop.__name__ and "d-old" in r.getMessage()]
    assert len(said) == 1 and "pkgapp" in said[0], said
