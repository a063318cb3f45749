"""The checked artifact versions a long-running control plane keeps: those a stored Model
names, that an agent was last sent (kept on an older version during a rollout) or that a data
centre's applied application names; a version nothing uses any more is forgotten, and no
longer served, after the pass that left it behind."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib

import pytest

from orchestrator import catalog
from orchestrator.adapters import serve_config
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.manifests import loader, schema
from orchestrator.reconciler import artifact_use, loop
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

SITES = ("edge-a", "edge-b")


class Fleet:
    """Agents of edge-a and edge-b on a real hub; each loads at once the version it is sent,
    but for the ``slow`` ones, which go on serving the one they had."""

    def __init__(self) -> None:
        self.hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), heartbeat_interval=1.0)
        self.ids = {site: self.hub.join(agent_model.JoinApplication(
            site, "tok", None, "", f"http://{site}:8081", agent_model.Location(), {}, "test", 1.0,
            agent_model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30))).agent_id for site in SITES}
        self.serving = {site: "" for site in SITES}
        self.slow: set[str] = set()
        self.seq = 0
        self.beat()

    def beat(self) -> None:
        """Each agent's heartbeat: the version it was asked for, the one it serves."""
        self.seq += 1
        for site in SITES:
            sent = self.hub.assignments(site)
            asked = next((a.sha256 for a in sent.assignments if a.model == "m"), "") if sent is not None else ""
            if site not in self.slow:
                self.serving[site] = asked
            models = (agent_model.ModelState("m", asked, agent_model.ModelPhase.READY, serving_sha256=self.serving[site]),) if asked else ()
            self.hub.record_heartbeat(site, self.ids[site], agent_model.Heartbeat(
                seq=self.seq, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30,
                assignment_version=sent.version if sent is not None else 0, draining=False, capacity=None, models=models,
                gpu_free_bytes=()))


def served(artifacts: artifacts_mod.ArtifactCatalog, versions: list[str]) -> list[str]:
    """The versions ``GET /v1/artifacts/<sha256>`` serves, of ``versions``."""
    out = []
    for sha in versions:
        opened = artifacts.open_checked(sha)
        if opened is not None:
            opened[0].close()
            out.append(sha)
    return out


def test_fifty_versions_of_a_model_leave_the_catalog_holding_the_live_ones(tmp_path: pathlib.Path) -> None:
    """A Model applied in 50 versions, each rolled out to both sites: the catalog serves the
    last one alone. A 51st that one site is slow to load: the other site, kept on the 50th
    while it waits its turn (it downloads it again after a restart), is still served it."""
    root = tmp_path / "artifacts"
    root.mkdir()
    store = store_mod.Store(tmp_path / "state.db")
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        manifests.edge_site("edge-a", "FR", 48.85, 2.35), manifests.edge_site("edge-b", "FR", 45.76, 4.84))), actor="test")
    fleet = Fleet()
    artifacts = artifacts_mod.ArtifactCatalog((root,), "http://cp")
    reconciler = loop.Reconciler(store, fleet.hub, dc_mod.DataCentres(dc_mod.LocalRay()), artifacts, endpoints_mod.EndpointTable())
    versions: list[str] = []

    def apply_version() -> str:
        body = f"version {len(versions)}".encode()
        (root / f"m-{len(versions)}.onnx").write_bytes(body)
        versions.append(hashlib.sha256(body).hexdigest())
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            manifests.onnx_model("m", f"m-{len(versions) - 1}.onnx", versions[-1]),
            manifests.deployment("d", "m", 2, manifests.spread_by_site(tiers=["edge"])))), actor="test")
        return versions[-1]

    async def rolled_out(sha: str, passes: int) -> None:
        """Passes until both sites serve ``sha`` (at most ``passes``)."""
        for _ in range(passes):
            await reconciler.reconcile_once()
            fleet.beat()
            if set(fleet.serving.values()) == {sha}:
                return

    try:
        for _ in range(50):
            sha = apply_version()
            asyncio.run(rolled_out(sha, passes=6))
            assert fleet.serving == {"edge-a": sha, "edge-b": sha}
        assert served(artifacts, versions) == [versions[-1]]

        fleet.slow.add("edge-a")  # takes the 51st, does not serve it yet: edge-b waits on the 50th
        latest = apply_version()
        asyncio.run(rolled_out(latest, passes=3))
        sent = {site: next(a.sha256 for a in fleet.hub.assignments(site).assignments) for site in SITES}  # type: ignore[union-attr]
        assert sent == {"edge-a": latest, "edge-b": versions[-2]}
        assert served(artifacts, versions) == versions[-2:]
    finally:
        store.close()


def model(*shas: str) -> schema.ModelSpec:
    return schema.ModelSpec.model_validate({"variants": [
        {"name": f"v{i}", "runtime": "onnx", "artifact": {"uri": f"m-{i}.onnx", "sha256": sha}, "resources": {"cpu": 0.1, "memoryMiB": 64}}
        for i, sha in enumerate(shas)]})


def assignment(sha: str) -> agent_model.Assignment:
    return agent_model.Assignment("m", "d", "v0", f"http://cp/v1/artifacts/{sha}", sha)


def app(sha: str | None) -> serve_config.ServeAppSpec:
    return serve_config.ServeAppSpec(name="a", route_prefix="/a", model_name="m", runtime="onnx" if sha else "ray-serve", num_replicas=1,
                                     artifact_uri=f"http://cp/v1/artifacts/{sha}" if sha else None, sha256=sha,
                                     import_path=None if sha else "pkg:app")


A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


@pytest.mark.parametrize(("models", "sent", "applied", "live"), [
    ({}, [], {}, set()),
    ({"m": model(A)}, [], {}, {A}),
    ({"m": model(A, B)}, [], {}, {A, B}),  # every variant
    ({"m": model(B)}, [(assignment(A),), ()], {}, {A, B}),  # an agent kept on A
    ({"m": model(B)}, [(agent_model.Assignment("m", "d", "v0", "", ""),)], {}, {B}),  # a set naming no version
    ({"m": model(C)}, [], {"dc": (app(A), app(None))}, {A, C}),  # a data centre's applied application
    ({"m": model(D)}, [(assignment(B),)], {"dc": (app(C),), "dc2": ()}, {B, C, D}),
])
def test_the_live_versions_are_those_a_model_an_agent_or_a_data_centre_names(
        models: dict[str, schema.ModelSpec], sent: list[tuple[agent_model.Assignment, ...]],
        applied: dict[str, tuple[serve_config.ServeAppSpec, ...]], live: set[str]) -> None:
    assert artifact_use.live(models, sent, applied) == live
