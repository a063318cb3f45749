"""An agent run with ``--serve-auth token`` holds callers of its own serving ports (HTTP v2,
OpenAI, gRPC) to the control plane's API tokens and their scope, as a gateway run with
``--gateway-auth token`` does, in the same words and error shapes; it decides from the list
its control plane sent (digests, never secrets), revocations included, and from the list it
kept on disk once its uplink is gone. Real control plane, real agent subprocess, loopback."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio

from edge_agent import serve_auth
from edgeplane_proto.agent.v1 import agent_pb2 as agent_pb
from edgeplane_proto.inference.v2 import inference_pb2 as pb
from orchestrator import client as client_mod
from orchestrator import ports
from orchestrator.testing import harness, manifests, onnx_models

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITE = "edge-paris"
BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}
REFUSED_OTHER = {"error": "this token may call only models 'intent', not 'fields'"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    root = pathlib.Path(tmp_path_factory.mktemp("serve-auth"))
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    f = harness.Fleet(root)
    try:
        cp = await f.start_control_plane(gateway_auth="token")
        admin = (root / "control-plane" / "admin.token").read_text().strip()
        bundle = manifests.bundle(
            manifests.edge_site(SITE, country="FR", region="fr", lat=48.85, lon=2.35),
            manifests.onnx_model("intent", "intent.onnx", built.sha256),
            manifests.onnx_model("fields", "intent.onnx", built.sha256),
            manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}),
            manifests.deployment("fields-fr", "fields", 1, {"residency": ["FR"], "tiers": ["edge"]}),
        )
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
            assert (await http.post("/v1/apply", content=bundle)).status_code == 200

            async def token(**scope: Any) -> str:
                made = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", **scope})
                assert made.status_code == 201, made.text
                return str(made.json()["token"])

            tokens = {"admin": admin, "scoped": await token(models=["intent"], residency=["EU"]),
                      "plain": await token(), "elsewhere": await token(models=["intent"], residency=["DE"])}
        port = ports.free_port()
        agent = await f.start_agent(SITE, country="FR", region="fr", lat=48.85, lon=2.35,
                                    extra=("--serve-auth", "token", "--grpc-listen", f"127.0.0.1:{port}"))
        for name in ("intent", "fields"):
            await harness.wait_until(lambda n=name: any(e.healthy for e in cp.table.endpoints(n)), 60, what=f"{name} served")
        yield {"fleet": f, "cp": cp, "agent": agent, "url": agent.url, "grpc": f"127.0.0.1:{port}", **tokens}
    finally:
        await f.stop()


def _as(fleet: dict[str, Any], who: str | None) -> httpx.AsyncClient:
    headers = {} if who is None else {"authorization": f"Bearer {fleet.get(who, who)}"}
    return httpx.AsyncClient(base_url=fleet["url"], headers=headers, timeout=30)


async def test_a_scoped_token_calls_its_own_model_at_the_agent_and_no_other(fleet: dict[str, Any]) -> None:
    async with _as(fleet, "scoped") as http:
        own = await http.post("/v2/models/intent/infer", json=BODY)
        refused = {path: await (http.post(path, json=BODY) if path.endswith("infer") else http.get(path))
                   for path in ("/v2/models/fields/infer", "/v2/models/fields", "/v2/models/fields/ready")}
    assert own.status_code == 200, own.text
    for path, answer in refused.items():
        assert (answer.status_code, answer.json()) == (403, REFUSED_OTHER), path  # the gateway's words


async def test_unscoped_read_and_admin_tokens_call_every_model(fleet: dict[str, Any]) -> None:
    for who in ("plain", "admin"):
        async with _as(fleet, who) as http:
            for model in ("intent", "fields"):
                answer = await http.post(f"/v2/models/{model}/infer", json=BODY)
                assert answer.status_code == 200, (who, model, answer.text)


@pytest.mark.parametrize("who", [None, "ep_not_a_token", "Basic dXNlcjpwdw=="])
async def test_a_missing_or_unknown_token_is_refused_and_probes_stay_open(fleet: dict[str, Any], who: str | None) -> None:
    headers = {} if who is None else {"authorization": who if who.startswith("Basic") else f"Bearer {who}"}
    async with httpx.AsyncClient(base_url=fleet["url"], headers=headers) as http:
        refused = await http.post("/v2/models/intent/infer", json=BODY)
        ready = await http.get("/v2/health/ready")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json() == {"error": "the agent needs 'Authorization: Bearer <token>' with a valid API token"}
    assert ready.status_code == 200


async def test_a_token_whose_residency_leaves_this_agents_country_out_is_refused(fleet: dict[str, Any]) -> None:
    async with _as(fleet, "elsewhere") as http:
        refused = await http.post("/v2/models/intent/infer", json=BODY)
    assert refused.status_code == 403
    assert refused.json()["error"].startswith("this agent is in FR, outside this token's residency (DE)")


async def test_the_openai_routes_refuse_in_openais_shape(fleet: dict[str, Any]) -> None:
    base = f"{fleet['url']}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=fleet["scoped"], max_retries=0) as app, \
            openai.AsyncOpenAI(base_url=base, api_key="ep_guess", max_retries=0) as stranger, \
            openai.AsyncOpenAI(base_url=base, api_key=fleet["elsewhere"], max_retries=0) as abroad:
        with pytest.raises(openai.PermissionDeniedError) as other:
            await app.chat.completions.create(model="fields", messages=[{"role": "user", "content": "hi"}])
        assert other.value.code == "model_not_allowed" and other.value.body["param"] == "model"  # type: ignore[index]
        assert other.value.type == "permission_error"
        with pytest.raises(openai.PermissionDeniedError) as card:
            await app.models.retrieve("fields")
        assert card.value.code == "model_not_allowed"
        with pytest.raises(openai.BadRequestError) as past:  # past the scope: intent is a v2 model
            await app.models.retrieve("intent")
        assert past.value.code == "model_not_generative"
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()
        with pytest.raises(openai.PermissionDeniedError) as outside:
            await abroad.models.list()
        assert outside.value.code == "residency_not_allowed"


async def test_grpc_takes_the_token_as_authorization_metadata(fleet: dict[str, Any]) -> None:
    def request(model: str) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 8], contents=pb.InferTensorContents(fp32_contents=[0.1] * 8))])

    async with grpc.aio.insecure_channel(fleet["grpc"]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        scoped = (("authorization", f"Bearer {fleet['scoped']}"),)
        answer = await infer(request("intent"), metadata=scoped)
        assert answer.model_name == "intent"
        for model, metadata, code, words in (
                ("fields", scoped, grpc.StatusCode.PERMISSION_DENIED, REFUSED_OTHER["error"]),
                ("intent", (), grpc.StatusCode.UNAUTHENTICATED, "the agent needs 'Authorization: Bearer <token>'"),
                ("intent", (("authorization", "Bearer ep_guess"),), grpc.StatusCode.UNAUTHENTICATED, "valid API token")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer(request(model), metadata=metadata)
            assert refused.value.code() is code and words in (refused.value.details() or ""), refused.value


async def test_a_revoked_token_is_refused_at_the_agent_after_the_next_update(fleet: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=fleet["cp"].http_url, headers={"authorization": f"Bearer {fleet['admin']}"}) as api:
        made = (await api.post("/v1/tokens", json={"purpose": "api", "role": "read"})).json()
        async with _as(fleet, made["token"]) as http:
            assert await _status_when(http, lambda s: s == 200) == 200  # the list reaches the agent within a refresh
            assert (await api.post(f"/v1/revoke/tokens/{made['id']}")).status_code == 200
            assert await _status_when(http, lambda s: s == 401) == 401


async def _status_when(http: httpx.AsyncClient, wanted: Any, timeout: float = 15.0) -> int:
    """The status of the agent's answer to an inference once ``wanted`` holds of it (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await http.post("/v2/models/intent/infer", json=BODY)).status_code
        if wanted(status) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def test_the_python_client_sends_its_token_to_the_agent_it_calls_directly(fleet: dict[str, Any]) -> None:
    async with client_mod.AsyncClient(fleet["cp"].http_url, token=fleet["scoped"]) as app:
        result = await app.infer("intent", {"input": np.full((1, 8), 0.1, dtype=np.float32)})
        with pytest.raises(client_mod.EdgeplaneError, match="may call only models 'intent'"):
            await app.infer("fields", {"input": np.full((1, 8), 0.1, dtype=np.float32)})
    assert result.site == SITE and result.url == fleet["url"]  # directly, not through the gateway


async def test_an_agent_restarted_without_uplink_enforces_the_list_it_kept(fleet: dict[str, Any]) -> None:
    """Last in this module: it stops the control plane."""
    f: harness.Fleet = fleet["fleet"]
    kept = f.agents[SITE].data_dir / serve_auth.FILE_NAME
    assert kept.stat().st_mode & 0o777 == 0o600
    assert fleet["scoped"] not in kept.read_text() and fleet["admin"] not in kept.read_text()  # digests only
    await f.cp.stop()  # type: ignore[union-attr]
    f.cp = None
    await asyncio.to_thread(f.agents[SITE].stop)
    agent = await f.restart_agent(SITE)
    fleet["url"] = agent.url
    async with _as(fleet, "scoped") as http:
        await harness.wait_until(lambda: re.search(r"serving 2 saved assignment", agent.log()), 30, what="saved assignments")
        assert await _status_when(http, lambda s: s == 200, 60) == 200  # its cached model, once loaded
        other = await http.post("/v2/models/fields/infer", json=BODY)
    async with _as(fleet, None) as http:
        missing = await http.post("/v2/models/intent/infer", json=BODY)
    assert (other.status_code, other.json()) == (403, REFUSED_OTHER)
    assert missing.status_code == 401


async def test_an_agent_that_never_had_a_list_fails_closed(tmp_path: pathlib.Path) -> None:
    """No control plane reached (or one of an earlier release, which sends no list): every
    model call is refused 503, saying why, and probes stay open."""
    cmd = harness.agent_command(f"127.0.0.1:{ports.free_port()}", "edge-lonely", tmp_path, country="FR",
                                extra=("--serve-auth", "token", "--insecure"))
    agent = await harness.spawn_agent_async(cmd, "edge-lonely", tmp_path)
    try:
        async with httpx.AsyncClient(base_url=agent.url) as http:
            refused = await http.post("/v2/models/intent/infer", json=BODY, headers={"authorization": "Bearer ep_x"})
            live = await http.get("/v2/health/live")
        assert refused.status_code == 503 and refused.json() == {"error": serve_auth.NO_LIST}
        assert live.status_code == 200
    finally:
        await asyncio.to_thread(agent.stop)


async def test_a_set_without_a_list_keeps_the_one_kept(tmp_path: pathlib.Path) -> None:
    """An update from a control plane of an earlier release (no ``serve_tokens``) changes nothing."""
    auth = serve_auth.ServeAuth(tmp_path, "FR", clock=lambda: 1000.0)
    auth.update(None)
    assert auth.admit("Bearer a", ("m",)) == serve_auth.Refusal(503, serve_auth.NO_LIST, "no_token_list")
    digest = hashlib.sha256(b"a").hexdigest()
    auth.update(agent_pb.ServeTokens(tokens=[agent_pb.ServeToken(sha256=digest, id="t1", models=["m"], expires_unix_ms=2_000_000)]))
    auth.update(None)
    assert auth.admit("Bearer a", ("m",)) is None
    assert serve_auth.ServeAuth(tmp_path, "FR", clock=lambda: 1000.0).admit("Bearer a", ("m",)) is None  # kept on disk
    expired = serve_auth.ServeAuth(tmp_path, "FR", clock=lambda: 2001.0)
    assert expired.admit("Bearer a", ("m",)) is not None and expired.admit("Bearer a", ("m",)).status == 401  # type: ignore[union-attr]


@pytest.mark.parametrize("kept", [
    b'{"format": 1, "tokens": []}',
    b'[1, 2]',
    b'{"format": 2, "tokens": {}}',
    b'{"format": 1, "tokens": {"ab": {"id": "t1", "models": "m", "residency": [], "countries": [], "expiresUnixMs": 0}}}',
    b'\xff\xfe not json',
])
async def test_an_unreadable_or_foreign_list_fails_closed_naming_the_file(tmp_path: pathlib.Path, kept: bytes) -> None:
    """A ``serve-tokens.json`` that is not this release's list (damaged, another format, or
    another program's file) is not used: every model call is refused 503 with the file and the
    cause named, and the agent starts; the next list sent replaces it."""
    (tmp_path / serve_auth.FILE_NAME).write_bytes(kept)
    auth = serve_auth.ServeAuth(tmp_path, "FR", clock=lambda: 1000.0)
    refused = auth.admit("Bearer a", ("m",))
    assert refused is not None and refused.status == 503 and refused.code == "no_token_list"
    assert str(tmp_path / serve_auth.FILE_NAME) in refused.message
    digest = hashlib.sha256(b"a").hexdigest()
    auth.update(agent_pb.ServeTokens(tokens=[agent_pb.ServeToken(sha256=digest, id="t1", models=["m"])]))
    assert auth.admit("Bearer a", ("m",)) is None
    assert serve_auth.ServeAuth(tmp_path, "FR").admit("Bearer a", ("m",)) is None
