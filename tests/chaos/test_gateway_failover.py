"""Two standalone gateway processes in front of one fleet; one of them is killed with -9
while callers send requests through both: the Python client fails over and no request fails."""

from __future__ import annotations

import asyncio
import pathlib
import signal

import httpx
import numpy as np
import pytest

from orchestrator import client as client_mod
from orchestrator.gatewayd import server as gatewayd
from orchestrator.testing import harness, onnx_models

from .conftest import fleet_yaml
from .proxy import ChaosProxy

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


async def test_a_silent_watch_is_given_up_for_the_next_control_plane(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """A partition that drops every byte and resets nothing: only the missing heartbeats tell."""
    fleet = harness.Fleet(tmp_path)
    proxy: ChaosProxy | None = None
    gw: gatewayd.StandaloneGateway | None = None
    try:
        cp = await fleet.start_control_plane()
        host, port = cp.http_url.removeprefix("http://").rsplit(":", 1)
        proxy = await ChaosProxy(host, int(port)).start()
        through_proxy = f"http://{proxy.address}"
        # heartbeats come every 5 s: 8 s of silence is a dead connection
        config = gatewayd.GatewayConfig(control_planes=(through_proxy, cp.http_url), port=0, silence_s=8.0, backoff_max_s=0.5)
        gw = await gatewayd.StandaloneGateway(config).start()
        follower = gw.follower
        assert await follower.wait_snapshot(0, 60) and follower.source == through_proxy
        seen = follower.snapshots
        proxy.blackhole()
        assert await follower.wait_snapshot(seen, 60), follower.status()  # the next snapshot comes from the next URL
        assert follower.source == cp.http_url and follower.ready
        assert f"control plane {through_proxy}: timed out" in caplog.text  # the silence, not a reset, ended it
    finally:
        if gw is not None:
            await gw.stop()
        if proxy is not None:
            await proxy.stop()
        await fleet.stop()
