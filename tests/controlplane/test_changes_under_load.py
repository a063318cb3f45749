"""Ordinary changes made while callers send requests through the gateway: a replica moved
to another site, an agent stopped, a deployment replaced by another of the same model, a
deployment applied again. Some allowed replica answers throughout each, so no caller gets
a failed request; a caller that must wait is told how long (503 with Retry-After). Real
agents over gRPC on loopback, real onnxruntime, the control plane in process."""

from __future__ import annotations

import asyncio
import pathlib
import signal
from typing import Any

import httpx
import numpy as np

from orchestrator import server
from orchestrator.testing import harness, manifests, onnx_models

MAX_REQUESTS = 20_000  # per caller: bounds a loop whose stop never comes


class Traffic:
    """Callers sending v2 requests for ``model`` through the gateway at ``url`` until the
    block ends: what each got, by site (200) or as the failure."""

    def __init__(self, url: str, model: onnx_models.BuiltModel, name: str = "intent", callers: int = 2) -> None:
        self.url, self.path, self.callers = url, f"/v2/models/{name}/infer", callers
        self.body = {"inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [1, model.in_dim],
                                 "data": np.ones(model.in_dim, np.float32).tolist()}]}
        self.failures: list[str] = []
        self.served: dict[str, int] = {}
        self.answered = asyncio.Event()  # some request was served since the block began
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        self._http = httpx.AsyncClient(base_url=self.url, timeout=30)
        self._tasks = [asyncio.create_task(self._call()) for _ in range(self.callers)]
        await asyncio.wait_for(self.answered.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._http.aclose()

    async def _call(self) -> None:
        for _ in range(MAX_REQUESTS):
            if self._stop.is_set():
                return
            try:
                r = await self._http.post(self.path, json=self.body, headers={"x-edgeplane-residency": "FR"})
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                continue
            if r.status_code != 200:
                self.failures.append(f"{r.status_code} retry-after={r.headers.get('retry-after')}: {r.text[:160]}")
                await asyncio.sleep(0.01)
                continue
            site = r.headers.get("x-edgeplane-site", "")
            self.served[site] = self.served.get(site, 0) + 1
            self.answered.set()

    def report(self) -> str:
        total = len(self.failures) + sum(self.served.values())
        return f"{len(self.failures)} of {total} requests failed; first: {self.failures[:3]}; served: {self.served}"


def _mlp(tmp_path: pathlib.Path) -> onnx_models.BuiltModel:
    return onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)


def _healthy_at(cp: server.ControlPlane, model: str = "intent") -> list[str]:
    return sorted(e.site for e in cp.table.endpoints(model) if e.healthy)


def _agents(sites: dict[str, float]) -> dict[str, dict[str, Any]]:
    return {name: dict(country="FR", region="fr", lat=lat, lon=2.35) for name, lat in sites.items()}


async def _apply(cp: server.ControlPlane, text: str) -> None:
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        r = await http.post("/v1/apply", content=text)
        assert r.status_code == 200, r.text


ZONES = {"edge-a": 48.0, "edge-b": 48.1}


def _by_zone(model: onnx_models.BuiltModel, zone: str) -> str:
    return manifests.bundle(
        *(manifests.doc("Site", name, {"tier": "edge", "location": {"country": "FR", "region": "fr", "lat": lat, "lon": 2.35}},
                        labels={"zone": name}) for name, lat in ZONES.items()),
        manifests.onnx_model("intent", model.path.name, model.sha256),
        manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"], "siteSelector": {"zone": zone}}),
    )


async def test_a_replica_moved_by_its_site_selector_answers_until_its_replacement_serves(tmp_path: pathlib.Path) -> None:
    model = _mlp(tmp_path)
    async with harness.serving_fleet(tmp_path, _by_zone(model, "edge-a"), _agents(ZONES), artifact_roots=(model.path.parent,),
                                     ready=lambda cp: _healthy_at(cp) == ["edge-a"], what="the replica on edge-a") as fleet:
        cp = fleet.cp
        assert cp is not None
        async with Traffic(cp.http_url, model) as traffic:
            await _apply(cp, _by_zone(model, "edge-b"))
            await harness.wait_until(lambda: _healthy_at(cp) == ["edge-b"], 60, what="the replica moved to edge-b")
            traffic.answered.clear()
            await asyncio.wait_for(traffic.answered.wait(), 30)
        assert traffic.served.get("edge-b"), traffic.report()
        assert traffic.failures == [], traffic.report()


CITIES = {"edge-a": 43.3, "edge-b": 50.6}


def _by_demand(model: onnx_models.BuiltModel, lat: float) -> str:
    return manifests.bundle(
        *(manifests.edge_site(name, "FR", la, 2.35, region="fr") for name, la in CITIES.items()),
        manifests.onnx_model("intent", model.path.name, model.sha256),
        manifests.doc("ModelDeployment", "intent-fr", {
            "model": "intent", "replicas": {"min": 1, "max": 1}, "placement": {"residency": ["FR"], "tiers": ["edge"]},
            "demand": [{"lat": lat, "lon": 2.35, "rps": 50}]}),
    )


async def test_a_replica_moved_toward_its_demand_answers_until_its_replacement_serves(tmp_path: pathlib.Path) -> None:
    model = _mlp(tmp_path)
    async with harness.serving_fleet(tmp_path, _by_demand(model, 43.3), _agents(CITIES), artifact_roots=(model.path.parent,),
                                     ready=lambda cp: _healthy_at(cp) == ["edge-a"], what="the replica at edge-a") as fleet:
        cp = fleet.cp
        assert cp is not None
        async with Traffic(cp.http_url, model) as traffic:
            await _apply(cp, _by_demand(model, 50.6))
            await harness.wait_until(lambda: _healthy_at(cp) == ["edge-b"], 60, what="the replica moved to edge-b, its demand there now")
            traffic.answered.clear()
            await asyncio.wait_for(traffic.answered.wait(), 30)
        assert traffic.served.get("edge-b"), traffic.report()
        assert traffic.failures == [], traffic.report()


async def test_callers_of_an_only_replica_whose_agent_stops_get_503_never_502(tmp_path: pathlib.Path) -> None:
    model = _mlp(tmp_path)
    only = {"edge-a": 48.0}
    text = manifests.bundle(manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"),
                            manifests.onnx_model("intent", model.path.name, model.sha256),
                            manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))
    async with harness.serving_fleet(tmp_path, text, _agents(only), artifact_roots=(model.path.parent,),
                                     ready=lambda cp: _healthy_at(cp) == ["edge-a"], what="the replica") as fleet:
        cp = fleet.cp
        assert cp is not None
        async with Traffic(cp.http_url, model, callers=3) as traffic:
            await asyncio.to_thread(fleet.agents["edge-a"].stop)  # SIGTERM; returns once the agent has exited
            refused = len(traffic.failures)
            await harness.wait_until(lambda: len(traffic.failures) >= refused + 50, 30, what="callers answered after the agent stopped")
        assert traffic.failures, traffic.report()
        wrong = [f for f in traffic.failures if not f.startswith("503 ")]  # no replica answers: none failed
        assert wrong == [], f"{len(wrong)} not a 503: {wrong[:3]}; " + traffic.report()


def _serving_for(cp: server.ControlPlane, site: str) -> str | None:
    status = cp.hub.status(site)
    state = status.models.get("intent") if status is not None else None
    return state.deployment if state is not None else None


def _deployment(name: str) -> str:
    return manifests.deployment(name, "intent", 1, {"residency": ["FR"], "tiers": ["edge"]})


async def test_a_deployment_replaced_by_another_of_the_same_model_is_served_throughout(tmp_path: pathlib.Path) -> None:
    model = _mlp(tmp_path)
    text = manifests.bundle(manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"),
                            manifests.onnx_model("intent", model.path.name, model.sha256), _deployment("intent-a"))

    def served_for(cp: server.ControlPlane) -> list[str]:
        return [e.deployment for e in cp.table.endpoints("intent") if e.healthy]

    async with harness.serving_fleet(tmp_path, text, _agents({"edge-a": 48.0}), artifact_roots=(model.path.parent,),
                                     ready=lambda cp: served_for(cp) == ["intent-a"], what="the replica") as fleet:
        cp = fleet.cp
        assert cp is not None
        async with Traffic(cp.http_url, model) as traffic, httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            await _apply(cp, _deployment("intent-b"))  # the agent serves the model once: for intent-a, first by name
            r = await http.delete("/v1/modeldeployments/intent-a")
            assert r.status_code == 200, r.text
            await harness.wait_until(lambda: served_for(cp) == ["intent-b"], 30, what="the replica answering for intent-b")
            await harness.wait_until(lambda: _serving_for(cp, "edge-a") == "intent-b", 30, what="the agent's heartbeat naming intent-b")
            traffic.answered.clear()
            await asyncio.wait_for(traffic.answered.wait(), 30)
        assert traffic.failures == [], traffic.report()


async def test_callers_of_a_deployment_applied_again_are_told_to_retry_until_it_serves(tmp_path: pathlib.Path) -> None:
    """The agent is held (SIGSTOP) from the moment it has let the deleted model go until the
    pass that places it again has published: a caller then meets the replica starting
    whatever the timing; the agent is let go, and callers are told to retry until it serves."""
    model = _mlp(tmp_path)
    text = manifests.bundle(manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"),
                            manifests.onnx_model("intent", model.path.name, model.sha256), _deployment("intent-fr"))
    async with harness.serving_fleet(tmp_path, text, _agents({"edge-a": 48.0}), artifact_roots=(model.path.parent,),
                                     ready=lambda cp: _healthy_at(cp) == ["edge-a"], what="the replica",
                                     missed_heartbeats=60) as fleet:  # held for a moment, the agent is not lost meanwhile
        cp = fleet.cp
        assert cp is not None
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            r = await http.delete("/v1/modeldeployments/intent-fr")
            assert r.status_code == 200, r.text
            await harness.wait_until(lambda: "intent" not in cp.hub.status("edge-a").models, 30,  # type: ignore[union-attr]
                                     what="the agent to let the model go")
            agent, traffic = fleet.agents["edge-a"], Traffic(cp.http_url, model)
            agent.kill(signal.SIGSTOP)
            try:
                await _apply(cp, _deployment("intent-fr"))
                await harness.wait_until(lambda: "intent" in cp.table.starting(), 30, what="the pass that places it again")
                r = await http.post(traffic.path, json=traffic.body, headers={"x-edgeplane-residency": "FR"})
                assert (r.status_code, r.headers.get("retry-after")) == (503, "2"), r.text
            finally:
                agent.kill(signal.SIGCONT)
        async with traffic:  # returns once a request is served again
            pass
        wrong = [f for f in traffic.failures if not f.startswith("503 retry-after=2:")]
        assert wrong == [], f"{len(wrong)} not a 503 with Retry-After: {wrong[:3]}; " + traffic.report()
