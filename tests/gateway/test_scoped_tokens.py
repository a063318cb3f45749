"""Scoped API tokens at the gateway (``--gateway-auth token``): a token made for some models
may call those alone, on the v2 routes, the OpenAI routes (seen by the official SDK) and the
endpoint list, refused 403 in each protocol's own error shape; a token with a residency holds
its requests to it, and a header naming a country outside it is refused, never overridden.
An unscoped token reaches every model as before. No agents: a request the scope lets through
reaches the model lookup, which answers that the model is not deployed (404)."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from orchestrator.gatewayd import server as gatewayd
from orchestrator.cli import main as cli_main
from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}
HI = [{"role": "user", "content": "hi"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    fleet = harness.Fleet(pathlib.Path(tmp_path_factory.mktemp("scoped")))
    try:
        cp = await fleet.start_control_plane(gateway_auth="token")
        admin = (fleet.root / "control-plane" / "admin.token").read_text().strip()
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
            made = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "models": ["intent", "chat"], "residency": ["FR"]})
            assert made.status_code == 201, made.text
            scoped = made.json()
            assert "warning" not in scoped  # this gateway reads tokens: the scope binds
            plain = (await http.post("/v1/tokens", json={"purpose": "api", "role": "read"})).json()
        yield {"url": cp.http_url, "scoped": scoped["token"], "plain": plain["token"], "admin": admin, "made": scoped}
    finally:
        await fleet.stop()


def _client(gateway: dict[str, Any], who: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gateway["url"], headers={"authorization": f"Bearer {gateway[who]}"})


async def test_a_scoped_token_calls_its_models_alone_on_the_v2_routes(gateway: dict[str, Any]) -> None:
    async with _client(gateway, "scoped") as http:
        refused = {path: await (http.post(path, json=BODY) if path.endswith("infer") else http.get(path))
                   for path in ("/v2/models/other/infer", "/v2/models/other", "/v2/models/other/ready",
                                "/v2/models/other/versions/1/infer", "/v2/models/other/versions/1")}
        allowed = await http.post("/v2/models/intent/infer", json=BODY)
    for path, answer in refused.items():
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json() == {"error": "this token may call only models 'intent', 'chat', not 'other'"}, path
    assert allowed.status_code == 404 and "not deployed" in allowed.json()["error"]  # past the scope
    assert gateway["made"]["models"] == ["intent", "chat"] and gateway["made"]["residency"] == ["FR"]


async def test_a_tokens_residency_binds_its_requests_and_a_header_outside_it_is_refused(gateway: dict[str, Any]) -> None:
    async with _client(gateway, "scoped") as http:
        outside = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": "DE"})
        group = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": "EU"})
        inside = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": "FR"})
    assert outside.status_code == 403 and outside.json()["error"] == \
        "X-Edgeplane-Residency names DE, outside this token's residency (FR): leave it out, or name countries within FR"
    assert group.status_code == 403
    assert inside.status_code == 404  # within the token's: routed
    async with _client(gateway, "plain") as http:  # an unscoped token: the header is the caller's, any model
        assert (await http.post("/v2/models/other/infer", json=BODY, headers={"x-edgeplane-residency": "DE"})).status_code == 404


async def test_a_scoped_token_is_refused_other_models_on_the_openai_routes(gateway: dict[str, Any]) -> None:
    base = f"{gateway['url']}/openai/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=gateway["scoped"], max_retries=0) as app, \
            openai.AsyncOpenAI(base_url=base, api_key=gateway["scoped"], max_retries=0,
                               default_headers={"x-edgeplane-residency": "DE"}) as elsewhere, \
            openai.AsyncOpenAI(base_url=base, api_key=gateway["plain"], max_retries=0) as unscoped:
        for model in ("other", "other:my-adapter"):  # an adapter by its base model
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await app.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
            assert refused.value.code == "model_not_allowed" and refused.value.body["param"] == "model"  # type: ignore[index]
        with pytest.raises(openai.PermissionDeniedError) as card:
            await app.models.retrieve("other")
        assert card.value.code == "model_not_allowed"
        with pytest.raises(openai.NotFoundError) as missing:  # past the scope: not deployed
            await app.completions.create(model="chat:my-adapter", prompt="hi")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.PermissionDeniedError) as outside:
            await elsewhere.chat.completions.create(model="chat", messages=HI)  # type: ignore[arg-type]
        assert outside.value.code == "residency_not_allowed"
        with pytest.raises(openai.NotFoundError):
            await unscoped.chat.completions.create(model="other", messages=HI)  # type: ignore[arg-type]


async def test_a_scoped_token_asks_the_endpoint_list_for_its_models_alone(gateway: dict[str, Any]) -> None:
    async with _client(gateway, "scoped") as http:
        other = await http.get("/v1/endpoints/other")
        outside = await http.get("/v1/endpoints/intent", params={"residency": "DE"})
        own = await http.get("/v1/endpoints/intent")
    assert other.status_code == 403 and other.json()["reason"] == "Forbidden"
    assert outside.status_code == 403 and outside.json()["parameter"] == "residency"
    assert own.status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"models": "intent"}, "models"), ({"models": ["intent", ""]}, "models"), ({"models": [3]}, "models"),
    ({"residency": ["UK"]}, "residency"), ({"residency": "FR"}, "residency"), ({"residency": [","]}, "residency"),
    ({"role": "admin", "models": ["intent"]}, "role"), ({"purpose": "bootstrap", "role": "agent", "models": ["intent"]}, "models"),
])
async def test_a_scope_that_cannot_bind_is_refused_at_creation(gateway: dict[str, Any], body: dict[str, Any], field: str) -> None:
    async with _client(gateway, "admin") as http:
        answer = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", **body})
        listed = (await http.get("/v1/tokens")).json()["items"]
    assert answer.status_code == 400 and answer.json()["field"] == field, answer.text
    assert len(listed) == 3  # nothing made: the admin token and the fixture's two


async def test_a_bootstrap_token_given_a_scope_is_told_the_role_that_takes_one(gateway: dict[str, Any]) -> None:
    async with _client(gateway, "admin") as http:
        answer = await http.post("/v1/tokens", json={"models": ["intent"]})  # purpose bootstrap, as the CLI sends by default
    assert answer.status_code == 400 and answer.json()["field"] == "models", answer.text
    assert "role 'read'" in answer.json()["error"] and "--role read" in answer.json()["error"], answer.text


@pytest.mark.parametrize("scope", [["--model", "intent"], ["--residency", "FR"], ["--role", "admin", "--model", "intent"]])
async def test_the_cli_refuses_a_scope_without_role_read_before_asking(scope: list[str], capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPLANE_TOKEN", "unused")
    # nothing listens on port 9: a request sent would be refused as unreachable
    assert cli_main.main(["--server", "http://127.0.0.1:9", "token", "create", *scope]) == 2
    assert capsys.readouterr().err == "error: --model and --residency scope a read token: add --role read\n"


async def test_the_cli_makes_a_scoped_token_and_lists_its_scope(gateway: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPLANE_TOKEN", gateway["admin"])

    def cli(*args: str) -> str:
        capsys.readouterr()
        assert cli_main.main(["--server", gateway["url"], *args]) == 0
        return capsys.readouterr().out

    made = json.loads(await asyncio.to_thread(cli, "token", "create", "--role", "read", "--model", "intent", "--model", "later",
                                              "--residency", "FR,DE", "-o", "json"))
    assert made["models"] == ["intent", "later"] and made["residency"] == ["FR", "DE"]  # a model not applied yet is kept
    table = await asyncio.to_thread(cli, "token", "list")
    row = next(line.split() for line in table.splitlines() if line.startswith(made["id"]))
    assert row[6:8] == ["intent,later", "FR,DE"]
    listed = json.loads(await asyncio.to_thread(cli, "token", "list", "-o", "json"))["items"]
    assert next(t for t in listed if t["id"] == made["id"])["residency"] == ["FR", "DE"]
    async with httpx.AsyncClient(base_url=gateway["url"], headers={"authorization": f"Bearer {made['token']}"}) as http:
        assert (await http.post("/v2/models/other/infer", json=BODY)).status_code == 403
        assert (await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": "DE"})).status_code == 404
        await asyncio.to_thread(cli, "revoke", "token", made["id"])  # its kept verdict, scope and all, goes at once
        assert (await http.post("/v2/models/intent/infer", json=BODY)).status_code == 401


async def test_a_standalone_gateway_holds_a_scoped_token_to_its_scope(gateway: dict[str, Any]) -> None:
    config = gatewayd.GatewayConfig(control_planes=(gateway["url"],), port=0, token=gateway["admin"], gateway_auth="token")
    standalone = await gatewayd.StandaloneGateway(config).start()
    try:
        assert await standalone.follower.wait_snapshot(0, 60)
        async with httpx.AsyncClient(base_url=standalone.http_url, headers={"authorization": f"Bearer {gateway['scoped']}"}) as http:
            other = await http.post("/v2/models/other/infer", json=BODY)
            outside = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": "DE"})
            listed = await http.get("/v1/endpoints/other")
            own = await http.post("/v2/models/intent/infer", json=BODY)
    finally:
        await standalone.stop()
    assert other.status_code == 403 and "not 'other'" in other.json()["error"]
    assert outside.status_code == 403 and listed.status_code == 403
    assert own.status_code == 404


#: A scoped token's refusal on the control API: an app's credential calls models, reads nothing else.
CONTROL_API_REFUSAL = "a scoped token (models, residency) calls models at the gateway and reads nothing of the control API"


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("GET", "/v1/sites"), ("GET", "/v1/sites/paris"), ("GET", "/v1/modeldeployments"),
    ("GET", "/v1/placements"), ("GET", "/v1/events"), ("GET", "/v1/cascades"), ("GET", "/v1/controlplane"),
    ("GET", "/v1/endpoints"), ("GET", "/v1/endpoints?watch=1"), ("POST", "/v1/wake/intent"), ("POST", "/v1/simulate"),
    ("GET", "/v1/captures/eu"), ("GET", "/v1/tokens"), ("POST", "/v1/apply"), ("POST", "/v1/distill/intent"),
    ("POST", "/v1/sites/paris/cordon"),
])
async def test_a_scoped_token_reads_nothing_of_the_control_api(gateway: dict[str, Any], method: str, path: str) -> None:
    async with _client(gateway, "scoped") as http:
        answer = await http.send(http.build_request(method, path), stream=True)  # a watch let through would never end
        assert answer.status_code == 403, answer.status_code
        await answer.aread()
    assert answer.json()["reason"] == "Forbidden" and CONTROL_API_REFUSAL in answer.json()["error"]


async def test_a_scoped_token_still_reaches_whoami_and_its_endpoint_list_and_an_unscoped_read_token_reads_all(
        gateway: dict[str, Any]) -> None:
    async with _client(gateway, "scoped") as http:
        whoami = await http.get("/v1/whoami")
        own = await http.get("/v1/endpoints/intent")
    async with _client(gateway, "plain") as http:
        models = await http.get("/v1/models")
        table = await http.get("/v1/endpoints")
    assert whoami.status_code == 200 and whoami.json()["models"] == ["intent", "chat"]
    assert own.status_code == 200
    assert models.status_code == 200 and table.status_code in (200, 503)  # 503: no table yet, but admitted
