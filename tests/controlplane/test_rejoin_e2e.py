"""A control plane restarted on its own SQLite database while a real agent serves the only
replica of a model, over real gRPC and HTTP on loopback: from its start until its agent has
rejoined and reported, and a few passes after, every endpoint table it publishes routes to
that agent, and every request its gateway takes meanwhile is answered by it.

Passes run back to back throughout, so that some run while the agent has joined and not
reported yet (between its join and its first heartbeat): the publishes made then are
counted, and the test says how many it saw (the narrow window is hit deterministically in
``test_rejoin_endpoints``)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

import httpx

from orchestrator import ports, server, server_config
from orchestrator.testing import harness, manifests, onnx_models

SITE = "edge-lyon"
WHERE = dict(country="FR", region="fr", lat=45.7, lon=4.8)
BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}


async def test_no_table_published_while_the_agent_rejoins_a_restarted_control_plane_lacks_its_endpoint(tmp_path: pathlib.Path) -> None:
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    body = manifests.bundle(manifests.edge_site(SITE, **WHERE), manifests.onnx_model("intent", "intent.onnx", built.sha256),
                            manifests.deployment("intent-eu", "intent", 1, manifests.spread_by_site(residency=["EU"], tiers=["edge"])))
    http_port, agent_port, join_port = ports.free_ports(3)
    fixed = dict(port=http_port, agent_port=agent_port, agent_join_port=join_port)
    fleet = harness.Fleet(tmp_path)
    restarted: server.ControlPlane | None = None
    try:
        cp = await fleet.start_control_plane(**fixed)
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=body)).status_code == 200
        await fleet.start_agent(SITE, **WHERE)  # type: ignore[arg-type]
        await harness.wait_until(lambda: [e.site for e in cp.table.endpoints("intent") if e.healthy] == [SITE], 60,
                                 what="intent served in Lyon")
        url = cp.table.endpoints("intent")[0].url
        await cp.stop()  # the agent goes on serving, and reconnects with its backoff
        fleet.cp = None

        config = server_config.ServerConfig(
            data_dir=tmp_path / "control-plane", heartbeat_interval_s=0.5, missed_heartbeats=3, resync_s=2.0,
            artifact_roots=(harness.EXAMPLES, tmp_path / "artifacts"), bootstrap_tokens=(harness.BOOTSTRAP_TOKEN,), **fixed)
        restarted = server.ControlPlane(config)
        starting = asyncio.create_task(restarted.start())
        published: list[tuple[bool, bool]] = []  # per publish: the endpoint routed, the agent joined and not reported

        def watch() -> None:
            agent = restarted.hub.status(SITE)
            published.append((any(e.url == url and e.healthy for e in restarted.table.endpoints("intent")),
                              agent is not None and not agent.reported))

        # the table's publisher is set early in the start, before agents are listened for
        await harness.wait_until(lambda: getattr(restarted, "publisher", None) is not None, 30, interval=0.001, what="the publisher")
        publish = restarted.table.on_change
        restarted.table.on_change = lambda: (watch(), publish())  # type: ignore[func-returns-value]
        await starting
        fleet.cp = restarted

        async def passes() -> None:
            while True:
                done = restarted.reconciler.passes
                restarted.reconciler.trigger("test")
                await restarted.reconciler.wait_for_pass(done)

        answers: list[int] = []

        async def requests() -> None:
            async with httpx.AsyncClient(base_url=restarted.http_url, timeout=10) as http:
                while True:
                    resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": "45.7,4.8"})
                    answers.append(resp.status_code)
                    await asyncio.sleep(0.005)

        running = [asyncio.create_task(passes()), asyncio.create_task(requests())]
        try:
            await harness.wait_until(lambda: (a := restarted.hub.status(SITE)) is not None and a.reported, 60, interval=0.01,
                                     what="the agent to rejoin and report")
            after = restarted.reconciler.passes
            await restarted.reconciler.wait_for_pass(after + 3)
        finally:
            for task in running:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # from the table the restart inherited on (the gateway routes with it from its start;
        # applying it sets the cascades before the endpoints, a change of the still empty
        # table made before the HTTP server listens, which no gateway watches)
        published = published[next(i for i, (routed, _) in enumerate(published) if routed):]
        lacking = [i for i, (routed, _) in enumerate(published) if not routed]
        assert not lacking, f"{len(lacking)} of {len(published)} tables published lacked the agent's endpoint: {published}"
        assert answers and set(answers) == {200}, f"the gateway answered {sorted(set(answers))} while the agent rejoined"
        print(f"{len(published)} tables published, {sum(gap for _, gap in published)} between the join and the first heartbeat; "
              f"{len(answers)} requests, all 200")
    finally:
        await fleet.stop()
