"""The gateway passes the caller's own token on to the agents that check tokens (``auth:
"token"``, an agent run with ``--serve-auth token``), over v2 and OpenAI alike, and to no
other; a gateway run with ``--gateway-auth none`` has no token to pass on, so it passes such
agents over (``X-Edgeplane-Skipped: <site>=auth``) and, with nothing else left, says why.
Real control plane, real agent subprocesses, loopback; each agent is reached through a
recorder on its advertised URL that keeps the headers of every request (test_client_token_direct)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from orchestrator import ports
from orchestrator.testing import genai_model, harness, manifests, onnx_models

from . import test_client_token_direct as direct

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: site: (--serve-auth, country, lat, lon)
SITES = {"edge-paris": ("token", "FR", 48.85, 2.35), "edge-brussels": ("none", "BE", 50.85, 4.35)}
PARIS = {"x-edgeplane-location": "48.85,2.35"}
BRUSSELS = {"x-edgeplane-location": "50.85,4.35"}
BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}
USER = [{"role": "user", "content": "Where does the model run?"}]


async def _fleet(root: pathlib.Path, gateway_auth: str, *, unplaced: str = "") -> AsyncIterator[dict[str, Any]]:
    """``unplaced``: a site whose agent is given no --country (it refuses a token with a residency)."""
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    chat = genai_model.build_package(root / "artifacts", name="chat")
    small = {"name": "small", **chat.manifest_fields(), "resources": {"cpu": 0.25}}
    small["artifact"] = {"uri": "chat.tar", "sha256": chat.sha256}
    f = harness.Fleet(root)
    recorders: dict[str, direct.Recorder] = {}
    try:
        cp = await f.start_control_plane(gateway_auth=gateway_auth)
        admin = (root / "control-plane" / "admin.token").read_text().strip()
        bundle = manifests.bundle(
            *(manifests.edge_site(site, country=country, region=country.lower(), lat=lat, lon=lon)
              for site, (_, country, lat, lon) in SITES.items()),
            manifests.onnx_model("intent", "intent.onnx", built.sha256),
            manifests.doc("Model", "chat", {"variants": [small]}),
            manifests.deployment("intent-eu", "intent", 2, manifests.spread_by_site(tiers=["edge"])),
            manifests.deployment("chat-eu", "chat", 2, manifests.spread_by_site(tiers=["edge"])),
        )
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
            assert (await http.post("/v1/apply", content=bundle)).status_code == 200
            made = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "models": ["intent", "chat"]})
            assert made.status_code == 201, made.text
            european = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "models": ["intent"], "residency": ["EU"]})
            assert european.status_code == 201, european.text
        for site, (auth, country, lat, lon) in SITES.items():
            port = ports.free_port()
            recorders[site] = recorder = direct.Recorder(port)
            await recorder.start()
            await f.start_agent(site, country="" if site == unplaced else country, region=country.lower(), lat=lat, lon=lon,
                                extra=("--serve-auth", auth, "--listen", f"127.0.0.1:{port}", "--advertise-url", recorder.url))
        await harness.wait_until(lambda: all(sum(e.healthy for e in cp.table.endpoints(m)) == 2 for m in ("intent", "chat")), 90,
                                 what="intent and chat served on both sites")
        yield {"cp": cp, "scoped": str(made.json()["token"]), "european": str(european.json()["token"]), "recorders": recorders}
    finally:
        for recorder in recorders.values():
            await recorder.close()
        await f.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    async for fleet in _fleet(pathlib.Path(tmp_path_factory.mktemp("gw-token")), "token"):
        yield fleet


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def unplaced(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    async for fleet in _fleet(pathlib.Path(tmp_path_factory.mktemp("gw-unplaced")), "token", unplaced="edge-paris"):
        yield fleet


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def open_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    async for fleet in _fleet(pathlib.Path(tmp_path_factory.mktemp("gw-none")), "none"):
        yield fleet


def _cleared(fleet: dict[str, Any]) -> dict[str, direct.Recorder]:
    recorders: dict[str, direct.Recorder] = fleet["recorders"]
    for recorder in recorders.values():
        recorder.heads.clear()
    return recorders


async def test_v2_through_the_gateway_passes_the_callers_token_to_the_agent_that_checks_it_alone(guarded: dict[str, Any]) -> None:
    recorders = _cleared(guarded)
    bearer = {"authorization": f"Bearer {guarded['scoped']}"}
    async with httpx.AsyncClient(base_url=guarded["cp"].http_url, headers=bearer, timeout=30) as http:
        paris = await http.post("/v2/models/intent/infer", json=BODY, headers=PARIS)
        brussels = await http.post("/v2/models/intent/infer", json=BODY, headers=BRUSSELS)
    assert (paris.status_code, paris.headers["x-edgeplane-site"]) == (200, "edge-paris"), paris.text
    assert (brussels.status_code, brussels.headers["x-edgeplane-site"]) == (200, "edge-brussels"), brussels.text
    assert [h.get("authorization") for h in recorders["edge-paris"].heads] == [bearer["authorization"]]
    assert direct._authorized(recorders["edge-brussels"]) == [False]


async def test_openai_through_the_gateway_passes_the_callers_token_to_the_agent_that_checks_it_alone(guarded: dict[str, Any]) -> None:
    recorders = _cleared(guarded)
    async with openai.AsyncOpenAI(base_url=f"{guarded['cp'].http_url}/openai/v1", api_key=guarded["scoped"], max_retries=0, timeout=60) as app:
        paris = await app.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=4, extra_headers=PARIS)
        brussels = await app.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=4, extra_headers=BRUSSELS)
    assert (paris.headers["x-edgeplane-site"], brussels.headers["x-edgeplane-site"]) == ("edge-paris", "edge-brussels")
    assert [h.get("authorization") for h in recorders["edge-paris"].heads] == [f"Bearer {guarded['scoped']}"]
    assert direct._authorized(recorders["edge-brussels"]) == [False]


async def test_an_agents_refusal_of_the_token_passed_on_is_the_callers_answer_with_no_failover_or_ejection(
        unplaced: dict[str, Any]) -> None:
    recorders = _cleared(unplaced)
    bearer = {"authorization": f"Bearer {unplaced['european']}"}
    async with httpx.AsyncClient(base_url=unplaced["cp"].http_url, headers=bearer, timeout=30) as http:
        answers = [await http.post("/v2/models/intent/infer", json=BODY, headers=PARIS) for _ in range(2)]
    for answer in answers:  # the agent, told no country, holds the token's residency against it
        assert (answer.status_code, answer.headers["x-edgeplane-site"]) == (403, "edge-paris"), answer.text
        assert "residency" in answer.json()["error"] and "x-edgeplane-failover" not in answer.headers
    assert len(recorders["edge-paris"].heads) == 2 and recorders["edge-brussels"].heads == []  # asked again: not ejected
    assert not unplaced["cp"].table.ejected()


async def test_an_open_gateway_passes_over_the_agents_that_check_tokens_saying_why(open_gateway: dict[str, Any]) -> None:
    recorders = _cleared(open_gateway)
    base = open_gateway["cp"].http_url
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        v2 = await http.post("/v2/models/intent/infer", json=BODY, headers={**PARIS, "authorization": f"Bearer {open_gateway['scoped']}"})
    async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="sk-unknown-to-edgeplane", max_retries=0, timeout=60) as app:
        chat = await app.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=4, extra_headers=PARIS)
    assert (v2.status_code, v2.headers["x-edgeplane-site"], v2.headers["x-edgeplane-skipped"]) == (200, "edge-brussels", "edge-paris=auth")
    assert (chat.headers["x-edgeplane-site"], chat.headers["x-edgeplane-skipped"]) == ("edge-brussels", "edge-paris=auth")
    assert recorders["edge-paris"].heads == []  # never tried
    assert direct._authorized(recorders["edge-brussels"]) == [False, False]  # nor a token it did not verify passed on


async def test_an_open_gateway_with_only_agents_that_check_tokens_answers_503_saying_why(open_gateway: dict[str, Any]) -> None:
    recorders = _cleared(open_gateway)
    base = open_gateway["cp"].http_url
    french = {**PARIS, "x-edgeplane-residency": "FR"}  # edge-paris alone
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        v2 = await http.post("/v2/models/intent/infer", json=BODY, headers=french)
    async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="sk-unknown-to-edgeplane", max_retries=0, timeout=60) as app:
        with pytest.raises(openai.APIStatusError) as chat:
            await app.chat.completions.create(model="chat", messages=USER, max_tokens=4, extra_headers=french)
    assert v2.status_code == 503
    assert "--serve-auth token: edge-paris" in v2.json()["error"] and "--gateway-auth none" in v2.json()["error"]
    assert chat.value.status_code == 503 and "--serve-auth token: edge-paris" in chat.value.message
    assert recorders["edge-paris"].heads == []
