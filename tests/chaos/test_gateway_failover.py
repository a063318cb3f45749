"""Two standalone gateway processes in front of one fleet; one of them is killed with -9
while callers send requests through both: the Python client fails over and no request fails."""

from __future__ import annotations

import asyncio
import pathlib
import signal

import httpx
import numpy as np

from orchestrator import client as client_mod
from orchestrator.testing import harness, onnx_models

from .conftest import fleet_yaml

SITES = {"edge-a": 48.0}
WORKERS = 4
REQUESTS = 400  # in all; the kill comes after KILL_AFTER of them
KILL_AFTER = 100


async def test_killing_a_gateway_fails_no_request(tmp_path: pathlib.Path, models) -> None:  # type: ignore[no-untyped-def]
    v1, _ = models
    sites = {name: dict(country="FR", region="fr", lat=lat, lon=2.35) for name, lat in SITES.items()}
    async with harness.serving_fleet(tmp_path, fleet_yaml(SITES, v1, 1), sites, artifact_roots=(v1.path.parent,),
                                     ready=lambda cp: any(e.healthy for e in cp.table.endpoints("intent")), timeout=60,
                                     what="the intent replica") as fleet:
        assert fleet.cp is not None
        gateways = [await harness.spawn_gateway_async([fleet.cp.http_url], f"gateway-{i}", tmp_path / f"gateway-{i}") for i in (1, 2)]
        try:
            await _run(gateways, v1)
        finally:
            for g in gateways:
                await asyncio.to_thread(g.stop)


async def _run(gateways: list[harness.AgentProcess], model: onnx_models.BuiltModel) -> None:
    urls = [g.url for g in gateways]
    x = np.ones((1, model.in_dim), np.float32)
    async with httpx.AsyncClient(timeout=30) as http:
        for url in urls:  # each gateway has its table (the readiness of a process elsewhere, polled and bounded)
            for _ in range(300):
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError(f"gateway {url} never became ready")
    done = 0
    failures: list[str] = []
    answered_by: dict[str, int] = {}
    killed = asyncio.Event()
    may_kill = asyncio.Event()

    async def worker(client: client_mod.AsyncClient) -> None:
        nonlocal done
        while done < REQUESTS:
            done += 1
            if done >= KILL_AFTER:
                may_kill.set()
            try:
                result = await client.infer("intent", {model.input_name: x})
            except client_mod.EdgeplaneError as exc:
                failures.append(str(exc))
                continue
            if killed.is_set():
                answered_by[result.url] = answered_by.get(result.url, 0) + 1

    async with client_mod.AsyncClient(urls, direct=False, timeout=30) as client:
        workers = [asyncio.create_task(worker(client)) for _ in range(WORKERS)]
        await asyncio.wait_for(may_kill.wait(), 120)
        gateways[0].kill(signal.SIGKILL)
        killed.set()
        await asyncio.wait_for(asyncio.gather(*workers), 300)
    assert gateways[0].process.wait(10) == -signal.SIGKILL
    assert failures == [], failures[:5]
    assert answered_by.get(urls[1], 0) > 0, answered_by  # the survivor took over
