"""The standalone gateway (``edgeplane gateway``) following a real control plane.

One control plane, two real agent processes (Paris, Berlin) serving ``intent`` (v2,
both sites) and ``chat`` (generative, Paris), and a standalone gateway on a real
loopback port whose first control-plane URL is dead (it has to move to the next). The
fleet changes (a model added, an agent killed) reach the gateway through the watch; the
control plane is stopped last and the gateway keeps answering from its last table.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
import yaml

from edge_agent import httplistener, httpmessages
from orchestrator import client as client_mod
from orchestrator.cli import main as cli
from orchestrator.gateway import endpoints
from orchestrator.gatewayd import follow
from orchestrator.gatewayd import server as gatewayd
from orchestrator.ports import free_port
from orchestrator.testing import genai_model, harness, manifests, onnx_models

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITES = {
    "edge-paris": dict(country="FR", region="fr", lat=48.8566, lon=2.3522),
    "edge-berlin": dict(country="DE", region="de", lat=52.52, lon=13.405),
}
BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}
USER = [{"role": "user", "content": "Where does the model run?"}]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, onnx_models.BuiltModel, genai_model.GenAIModel]:
    root = tmp_path_factory.mktemp("gw-standalone")
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    chat = genai_model.build_package(root / "artifacts", name="chat")
    return root, built, chat


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(artifacts: tuple[Any, onnx_models.BuiltModel, genai_model.GenAIModel]) -> AsyncIterator[harness.Fleet]:
    root, built, chat = artifacts
    variant = {"name": "small", **chat.manifest_fields(), "resources": {"cpu": 0.25},
               "artifact": {"uri": "chat.tar", "sha256": chat.sha256}}
    body = manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in SITES.items()),
        manifests.onnx_model("intent", "intent.onnx", built.sha256),
        manifests.doc("Model", "chat", {"variants": [variant]}),
        manifests.deployment("intent-eu", "intent", 2, manifests.spread_by_site(residency=["EU"], tiers=["edge"])),
        manifests.deployment("chat-fr", "chat", 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )

    def ready(cp: Any) -> bool:
        return len([e for e in cp.table.endpoints("intent") if e.healthy]) == 2 and len(cp.table.endpoints("chat")) == 1

    async with harness.serving_fleet(root, body, SITES, ready=ready, what="intent on two sites and chat in Paris", timeout=120) as f:
        yield f


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(fleet: harness.Fleet) -> AsyncIterator[gatewayd.StandaloneGateway]:
    assert fleet.cp is not None
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the follower moves on to the next URL
    config = gatewayd.GatewayConfig(control_planes=(dead, fleet.cp.http_url), port=0, silence_s=6.0, backoff_max_s=0.5)
    gw = await gatewayd.StandaloneGateway(config).start()
    try:
        assert await gw.follower.wait_snapshot(0, 60), f"no endpoint table from the control plane: {gw.follower.status()}"
        yield gw
    finally:
        await gw.stop()


async def await_table(gw: gatewayd.StandaloneGateway, holds: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait, snapshot by snapshot as the watch delivers them, until ``holds()`` (bounded)."""
    deadline = time.monotonic() + timeout
    while not holds():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the gateway's table did not show {what} within {timeout:.0f}s: {gw.follower.status()}")
        await gw.follower.wait_update(gw.follower.updates, left)


async def test_the_control_plane_serves_its_table_once_and_as_a_watch(fleet: harness.Fleet) -> None:
    assert fleet.cp is not None
    async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=30) as http:
        once = (await http.get("/v1/endpoints")).json()
        assert once["type"] == "snapshot" and isinstance(once["version"], int) and once["epoch"]
        assert sorted({e["site"] for e in once["table"]["endpoints"] if e["model"] == "intent"}) == ["edge-berlin", "edge-paris"]
        assert (await http.get("/v1/endpoints", params={"watch": "maybe"})).status_code == 400
        async with http.stream("GET", "/v1/endpoints", params={"watch": "1"}) as resp:
            assert resp.headers["content-type"].startswith("application/x-ndjson")
            lines = resp.aiter_lines()
            first = json.loads(await anext(lines))
            assert first["type"] == "snapshot" and first["epoch"] == once["epoch"]
            assert first["table"]["endpoints"]
        whoami = await http.get("/v1/whoami", headers={"authorization": "Bearer not-a-token"})
        assert whoami.status_code == 401


async def test_v2_inference_and_openai_chat_through_the_standalone_gateway(gateway: gatewayd.StandaloneGateway,
                                                                            fleet: harness.Fleet) -> None:
    assert fleet.cp is not None
    assert gateway.follower.source == fleet.cp.http_url  # the dead first URL was left behind
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=60) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["epoch"] == fleet.cp.publisher.epoch
        for location, site in (("48.9,2.4", "edge-paris"), ("52.4,13.3", "edge-berlin")):
            resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": location})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-edgeplane-site"] == site and resp.json()["outputs"][0]["shape"] == [1, 4]
        missing = await http.post("/v2/models/nope/infer", json=BODY)
        assert missing.status_code == 404 and "intent" in missing.json()["error"]
        listed = (await http.get("/v1/endpoints/intent", params={"lat": 52.5, "lon": 13.4})).json()
        assert [e["site"] for e in listed["endpoints"]] == ["edge-berlin", "edge-paris"]
        for region, first in (("de", "edge-berlin"), ("fr", "edge-paris")):  # a caller known by its region only
            listed = (await http.get("/v1/endpoints/intent", params={"region": region})).json()
            assert listed["endpoints"][0]["site"] == first, region
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.http_url}/openai/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        whole = await sdk.chat.completions.create(model="chat", messages=USER, max_tokens=6, temperature=0)
        assert whole.usage is not None and whole.usage.completion_tokens == 6
        stream = await sdk.chat.completions.create(model="chat", messages=USER, max_tokens=6, temperature=0, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == whole.choices[0].message.content
    finally:
        await sdk.close()
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.http_url}/v1", api_key="unused", max_retries=0, timeout=60)  # the SDK's own layout
    try:
        assert "chat" in [m.id for m in (await sdk.models.list()).data]
        again = await sdk.chat.completions.create(model="chat", messages=USER, max_tokens=6, temperature=0)
        assert again.choices[0].message.content == whole.choices[0].message.content
    finally:
        await sdk.close()
    # The Python client reads the endpoint list from the gateway and calls the nearest replica.
    async with client_mod.AsyncClient(gateway.http_url, location=(48.85, 2.35)) as c:
        result = await c.infer("intent", {"input": np.full((1, 8), 0.1, np.float32)})
        assert result.site == "edge-paris" and result.outputs["output"].shape == (1, 4)


async def test_both_gateways_and_an_agent_return_the_request_id_of_each_answer(gateway: gatewayd.StandaloneGateway, fleet: harness.Fleet) -> None:
    assert fleet.cp is not None
    for url in (gateway.http_url, fleet.cp.http_url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            served = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-request-id": "ticket-81.1"})
            assert served.status_code == 200 and served.headers["x-request-id"] == "ticket-81.1", url
            missing = await http.post("/v2/models/nope/infer", json=BODY, headers={"x-request-id": "ticket-81.2"})
            assert missing.status_code == 404 and missing.headers["x-request-id"] == "ticket-81.2", url
            replaced = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-request-id": "jane@example.com"})
            made = replaced.headers["x-request-id"]
            assert len(made) == 32 and int(made, 16) >= 0, url
        sdk = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            whole = await sdk.chat.completions.create(model="chat", messages=USER, max_tokens=2, extra_headers={"x-request-id": "ticket-81.3"})
            assert whole._request_id == "ticket-81.3", url
            with pytest.raises(openai.NotFoundError) as unknown:
                await sdk.chat.completions.create(model="nope", messages=USER, extra_headers={"x-request-id": "ticket-81.4"})
            assert unknown.value.request_id == "ticket-81.4", url
        finally:
            await sdk.close()
    agent = next(e for e in fleet.cp.table.endpoints("intent") if e.site == "edge-paris")  # a real agent process, called directly
    async with httpx.AsyncClient(base_url=agent.url, timeout=60) as http:
        served = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-request-id": "ticket-81.5"})
        missing = await http.post("/v2/models/nope/infer", json=BODY, headers={"x-request-id": "ticket-81.6"})
        unnamed = await http.post("/v2/models/intent/infer", json=BODY)
    assert (served.status_code, served.headers.get("x-request-id")) == (200, "ticket-81.5")
    assert (missing.status_code, missing.headers.get("x-request-id")) == (404, "ticket-81.6")
    assert "x-request-id" not in unnamed.headers  # an agent returns an id, and makes none


async def test_a_model_added_reaches_the_gateway_through_the_watch(gateway: gatewayd.StandaloneGateway, fleet: harness.Fleet,
                                                                   artifacts: tuple[Any, onnx_models.BuiltModel, Any]) -> None:
    assert fleet.cp is not None
    _, built, _ = artifacts
    version = gateway.follower.version
    added = manifests.bundle(manifests.onnx_model("fields", "intent.onnx", built.sha256),
                             manifests.deployment("fields-de", "fields", 1, {"residency": ["DE"], "tiers": ["edge"]}))
    async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/apply", content=added)).status_code == 200
    await await_table(gateway, lambda: any(e.healthy for e in gateway.table.endpoints("fields")), "the fields endpoint")
    assert gateway.follower.version is not None and version is not None and gateway.follower.version > version
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=60) as http:
        resp = await http.post("/v2/models/fields/infer", json=BODY)
        assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-berlin"


async def test_the_gateway_checks_api_tokens_with_the_control_plane(fleet: harness.Fleet) -> None:
    assert fleet.cp is not None
    async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=30) as http:
        created = await http.post("/v1/tokens", json={"purpose": "api", "role": "read"})
        assert created.status_code == 201, created.text
        token = created.json()["token"]
    config = gatewayd.GatewayConfig(control_planes=(fleet.cp.http_url,), port=0, gateway_auth="token")
    gw = await gatewayd.StandaloneGateway(config).start()
    try:
        assert await gw.follower.wait_snapshot(0, 60)
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=60) as http:
            assert (await http.post("/v2/models/intent/infer", json=BODY)).status_code == 401
            wrong = await http.post("/v2/models/intent/infer", json=BODY, headers={"authorization": "Bearer wrong"})
            assert wrong.status_code == 401
            for odd in (b"Bearer caf\xe9", b"Bearer \xff"):  # legal header bytes no token holds: refused, not a 500
                refused = await http.post("/v2/models/intent/infer", json=BODY, headers={"authorization": odd})
                assert refused.status_code == 401, (odd, refused.text)
            for _ in range(3):  # the second and third are answered from the cache
                ok = await http.post("/v2/models/intent/infer", json=BODY, headers={"authorization": f"Bearer {token}"})
                assert ok.status_code == 200, ok.text
            chat = await http.post("/openai/v1/chat/completions", json={"model": "chat", "messages": USER, "max_tokens": 2})
            assert chat.status_code == 401 and chat.json()["error"]["code"] == "invalid_api_key"
            assert (await http.get("/readyz")).status_code == 200  # probes stay open
    finally:
        await gw.stop()


async def test_an_agent_lost_reaches_the_gateway_through_the_watch(gateway: gatewayd.StandaloneGateway, fleet: harness.Fleet) -> None:
    fleet.agents["edge-berlin"].kill(signal.SIGKILL)
    await await_table(gateway, lambda: not any(e.healthy and e.site == "edge-berlin" for e in gateway.table.endpoints("intent")),
                      "edge-berlin's intent replica gone or unhealthy")
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=60) as http:
        resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": "52.4,13.3"})
        assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-paris"


async def test_with_the_control_plane_stopped_the_gateway_serves_its_last_table(gateway: gatewayd.StandaloneGateway,
                                                                                fleet: harness.Fleet) -> None:
    """Runs last: it stops the module's control plane."""
    cp = fleet.cp
    assert cp is not None
    await cp.stop()
    fleet.cp = None
    await harness.wait_until(lambda: not gateway.follower.connected and gateway.follower.last_error, 30,
                             what="the gateway to notice the control plane is gone")
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=60) as http:
        for _ in range(5):
            resp = await http.post("/v2/models/intent/infer", json=BODY)
            assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-paris"
        chat = await http.post("/openai/v1/chat/completions", json={"model": "chat", "messages": USER, "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["lastError"]


# -- the command line ---------------------------------------------------------------------------


def gateway_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=harness.REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("args, message", [
    (("--control-plane", "not-a-url"), "is not an http(s) URL"),
    (("--control-plane", "http://127.0.0.1:8080/v1/endpoints"), "without a path"),
    (("--control-plane", "http://127.0.0.1:99999"), "invalid port"),
    (("--control-plane", "http://ops:s3cret@127.0.0.1:8080"), "no user name or password in the URL"),  # never shown
    (("--control-plane", "http://127.0.0.1:8080", "--location", "paris"), "--location 'paris' is not lat,lon"),
    (("--control-plane", "http://127.0.0.1:8080", "--gateway-rate", "-1"), "--gateway-rate"),
])
async def test_bad_flags_are_one_line_errors(args: tuple[str, ...], message: str) -> None:
    done = await asyncio.to_thread(gateway_cli, *args)
    assert done.returncode == 2, done
    assert message in done.stderr and "Traceback" not in done.stderr and "s3cret" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr


async def test_an_unreachable_control_plane_leaves_the_gateway_unready_with_the_reason(tmp_path: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = await harness.spawn_gateway_async([dead], "gateway", tmp_path)
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as http:
            status: dict[str, Any] = {}
            for _ in range(150):  # a process elsewhere: its readiness is polled, bounded (30 s)
                resp = await http.get("/readyz")
                status = resp.json()
                if resp.status_code == 503 and status["lastError"]:
                    break
                await asyncio.sleep(0.2)
            assert status.get("lastError"), f"the gateway never reported why it is not ready: {status}"
            assert dead in status["lastError"] and "unreachable" in status["lastError"]
            refused = await http.post("/v2/models/intent/infer", json=BODY)
            assert refused.status_code == 503 and "no endpoint table" in refused.json()["error"]
            assert (await http.get("/v2/health/ready")).status_code == 503
            chat = await http.post("/openai/v1/chat/completions", json={"model": "chat", "messages": USER})
            assert chat.status_code == 503 and chat.json()["error"]["type"] == "server_error" and chat.json()["error"]["code"] is None
            assert chat.headers["retry-after"] == "2"
    finally:
        proc.stop()
    assert "Traceback" not in proc.log() and "unreachable" in proc.log()


async def test_the_gateway_calls_a_control_plane_inside_a_no_proxy_block_directly(tmp_path: Any,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``NO_PROXY=127.0.0.0/8`` holds for the gateway as for the client and the CLI: httpx,
    left to read the environment, took the block for the one host 127.0.0.0 and sent the
    watch and the token checks to ``HTTP_PROXY``, here a port nothing listens on."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            token = (await http.post("/v1/tokens", json={"purpose": "api", "role": "read"})).json()["token"]
        for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.0/8")
        follower = follow.TableFollower([cp.http_url], endpoints.EndpointTable(), backoff_max_s=0.5)
        checker = follow.TokenChecker(follower)
        following = asyncio.create_task(follower.run())
        try:
            assert await follower.wait_snapshot(0, timeout=30), follower.last_error
            assert await checker.check(token) is not None
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await checker.close()
            await follower.close()
    finally:
        await fleet.stop()


async def wakes_answered(follower: follow.TableFollower) -> None:
    """Waits (10 s at most) until every wake call ``follower`` sent has its answer. Read from
    its private record of the calls on their way: it shows none, and the test must know a
    call is over before it asks whether a later request sends another."""
    await asyncio.wait_for(asyncio.gather(*follower._wakes.values()), 10)


async def test_a_burst_of_requests_for_a_cold_model_sends_one_wake_at_a_time() -> None:
    """Each request for a model scaled to zero wakes it; the gateway sends the control plane
    one ``POST /v1/wake`` per model at a time, not one per request."""
    asked: list[str] = []
    both, answer = asyncio.Event(), asyncio.Event()

    async def control_plane(request: httpmessages.Request) -> httpmessages.Response:
        asked.append(request.path)
        if len(asked) == 2:
            both.set()
        await answer.wait()  # held: every later wake of the same model finds this one on its way
        return httpmessages.Response(202, b'{"woken": true}', headers=(("content-type", "application/json"),))

    server = httplistener.HttpServer(control_plane)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    follower = follow.TableFollower([f"http://127.0.0.1:{sock.getsockname()[1]}"], endpoints.EndpointTable())
    try:
        for _ in range(20):
            follower.wake("lazy")
        follower.wake("other")
        await asyncio.wait_for(both.wait(), 10)
        answer.set()
        await wakes_answered(follower)
        follower.wake("lazy")  # the call answered: a later request asks again
        await wakes_answered(follower)
    finally:
        await follower.close()
        await server.shutdown(1)
    assert sorted(asked) == ["/v1/wake/lazy", "/v1/wake/lazy", "/v1/wake/other"]


async def test_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = await asyncio.to_thread(gateway_cli, "--control-plane", "http://127.0.0.1:8080", "--port", port)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port} (--host/--port): Address already in use"


async def test_the_kubernetes_manifest_starts_the_gateway_with_flags_it_accepts() -> None:
    docs = list(yaml.safe_load_all((harness.REPO / "manifests" / "deploy" / "gateway.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = cli.build_parser().parse_args(container["args"])
    config = gatewayd.config_from_args(args, token="from-the-secret")
    assert args.command == "gateway" and config.control_planes == ("http://edgeplane-control-plane.edgeplane.svc:8080",)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert any(e["name"] == "EDGEPLANE_TOKEN" for e in container["env"])


async def test_edgeplane_infer_goes_through_a_standalone_gateway(gateway: gatewayd.StandaloneGateway, fleet: harness.Fleet,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """After the test that stopped the control plane: the gateway alone answers."""
    assert fleet.cp is None
    data = json.dumps({"input": [[0.1] * 8]})
    code = await asyncio.to_thread(cli.main, ["infer", "intent", "--server", gateway.http_url, "--data", data, "-o", "json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads(out)["servedBy"] == "edge-paris"
    # a bare array for a model of one input: its name comes from the model's metadata
    code = await asyncio.to_thread(cli.main, ["infer", "intent", "--server", gateway.http_url, "--data", json.dumps([[0.1] * 8]), "-o", "json"])
    bare = capsys.readouterr().out
    assert code == 0 and json.loads(bare)["outputs"] == json.loads(out)["outputs"], bare


