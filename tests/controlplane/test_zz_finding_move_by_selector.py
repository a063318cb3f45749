"""A replica moved from one edge site to another by a siteSelector change, while callers send
requests through the gateway: the old replica should answer until the new one serves
(make before break), so no request fails."""

from __future__ import annotations

import asyncio
import pathlib

import httpx
import numpy as np

from orchestrator.testing import harness, manifests, onnx_models

SITES = {"edge-a": 48.0, "edge-b": 48.1}


def _yaml(model: onnx_models.BuiltModel, zone: str) -> str:
    return manifests.bundle(
        *(manifests.doc("Site", name, {"tier": "edge", "location": {"country": "FR", "region": "fr", "lat": lat, "lon": 2.35}},
                        labels={"zone": name}) for name, lat in SITES.items()),
        manifests.onnx_model("intent", model.path.name, model.sha256),
        manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"], "siteSelector": {"zone": zone}}),
    )


async def test_moving_a_replica_by_site_selector_fails_no_request(tmp_path: pathlib.Path) -> None:
    model = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    agents = {name: dict(country="FR", region="fr", lat=lat, lon=2.35) for name, lat in SITES.items()}

    def healthy_at(cp, site: str) -> bool:  # noqa: ANN001
        return any(e.healthy and e.site == site for e in cp.table.endpoints("intent"))

    async with harness.serving_fleet(tmp_path, _yaml(model, "edge-a"), agents, artifact_roots=(model.path.parent,),
                                     ready=lambda cp: healthy_at(cp, "edge-a"), timeout=60, what="the replica on edge-a") as fleet:
        cp = fleet.cp
        assert cp is not None
        body = {"inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [1, model.in_dim],
                            "data": np.ones(model.in_dim, np.float32).tolist()}]}
        failures: list[str] = []
        served: dict[str, int] = {}
        stop = asyncio.Event()

        async def caller(http: httpx.AsyncClient) -> None:
            while not stop.is_set():
                try:
                    r = await http.post("/v2/models/intent/infer", json=body, headers={"x-edgeplane-residency": "FR"})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:160]}")
                    await asyncio.sleep(0.01)
                    continue
                site = r.headers.get("x-edgeplane-site", "")
                served[site] = served.get(site, 0) + 1

        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            callers = [asyncio.create_task(caller(http)) for _ in range(2)]
            await asyncio.sleep(0.5)
            r = await http.post("/v1/apply", content=_yaml(model, "edge-b"))
            assert r.status_code == 200, r.text
            await harness.wait_until(lambda: healthy_at(cp, "edge-b") and not healthy_at(cp, "edge-a"), 60,
                                     what="the replica moved to edge-b")
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*callers)
        total = len(failures) + sum(served.values())
        assert served.get("edge-b", 0) > 0, served
        assert failures == [], f"{len(failures)} of {total} requests failed during the move; first: {failures[:3]}; served: {served}"
