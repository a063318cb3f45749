"""Bad input at the gateway and the agents, over real HTTP: a region no site declares, a
model version the replicas do not have, booleans as numbers, wrong methods, and a position
the standalone gateway's endpoint list cannot read.

One control plane, two real agents (Paris, Berlin) serving ``intent``, and a site declared
in Oslo (region ``no``, outside the deployment's EU residency) where nothing runs.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from orchestrator.gatewayd import server as gatewayd
from orchestrator.testing import harness, manifests, onnx_models

pytestmark = pytest.mark.asyncio(loop_scope="module")

AGENTS = {
    "edge-paris": dict(country="FR", region="fr", lat=48.8566, lon=2.3522),
    "edge-berlin": dict(country="DE", region="de", lat=52.52, lon=13.405),
}
OSLO = dict(country="NO", region="no", lat=59.91, lon=10.75)
BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}
UNKNOWN = {"x-edgeplane-region": "atlantis"}
UNKNOWN_SAID = ("X-Edgeplane-Region: unknown region 'atlantis' (known regions: de, fr, no); "
                "give X-Edgeplane-Location: lat,lon instead")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, onnx_models.BuiltModel]:
    root = tmp_path_factory.mktemp("bad-input")
    return root, onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(model: tuple[pathlib.Path, onnx_models.BuiltModel]) -> AsyncIterator[harness.Fleet]:
    root, built = model
    body = manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in AGENTS.items()),
        manifests.edge_site("edge-oslo", **OSLO),  # declared, no agent: its region is known all the same
        manifests.onnx_model("intent", "intent.onnx", built.sha256),
        manifests.deployment("intent-eu", "intent", 2, manifests.spread_by_site(residency=["EU"], tiers=["edge"])),
    )
    async with harness.serving_fleet(root, body, AGENTS, ready=lambda cp: len([e for e in cp.table.endpoints("intent") if e.healthy]) == 2,
                                     what="intent in Paris and Berlin", timeout=120) as f:
        yield f


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(fleet: harness.Fleet) -> AsyncIterator[gatewayd.StandaloneGateway]:
    assert fleet.cp is not None
    async with harness.following_gateway(fleet.cp.http_url) as gw:
        yield gw


def version_of(model: tuple[pathlib.Path, onnx_models.BuiltModel]) -> str:
    return model[1].sha256[:12]


def url_of(fleet: harness.Fleet) -> str:
    assert fleet.cp is not None
    return fleet.cp.http_url


async def test_an_unknown_region_is_400_on_every_route_that_places_the_caller(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway,
                                                                              model: tuple[pathlib.Path, onnx_models.BuiltModel]) -> None:
    chat = {"model": "intent", "messages": [{"role": "user", "content": "hi"}]}
    for base in (url_of(fleet), gateway.http_url):  # the standalone gateway knows the regions from the table it follows
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            answers = {
                "infer": await http.post("/v2/models/intent/infer", json=BODY, headers=UNKNOWN),
                "versioned infer": await http.post(f"/v2/models/intent/versions/{version_of(model)}/infer", json=BODY, headers=UNKNOWN),
                "metadata": await http.get("/v2/models/intent", headers=UNKNOWN),
                "ready": await http.get("/v2/models/intent/ready", headers=UNKNOWN),
                "openai chat": await http.post("/openai/v1/chat/completions", json=chat, headers=UNKNOWN),
                "openai models": await http.get("/openai/v1/models", headers=UNKNOWN),
            }
        for route, resp in answers.items():
            assert resp.status_code == 400, (base, route, resp.text)
            error = resp.json()["error"]
            assert (error["message"] if isinstance(error, dict) else error) == UNKNOWN_SAID, (base, route)


async def test_a_region_with_sites_but_no_replica_is_routed_as_usual(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway) -> None:
    for base in (url_of(fleet), gateway.http_url):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            nearest = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-region": "no"})
            none_there = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-region": "no", "x-edgeplane-residency": "NO"})
        assert nearest.status_code == 200, nearest.text
        assert nearest.headers["x-edgeplane-site"] == "edge-berlin"  # the nearer to Oslo
        assert none_there.status_code == 503 and "no replica in the caller's residency (NO)" in none_there.json()["error"]


async def test_a_listed_version_answers_as_the_model_does(fleet: harness.Fleet, model: tuple[pathlib.Path, onnx_models.BuiltModel]) -> None:
    version = version_of(model)
    async with httpx.AsyncClient(base_url=url_of(fleet), timeout=30) as http:
        meta = await http.get("/v2/models/intent")
        assert meta.status_code == 200 and meta.json()["versions"] == [version]
        infer = await http.post(f"/v2/models/intent/versions/{version}/infer", json=BODY)
        assert infer.status_code == 200, infer.text
        assert infer.json()["model_version"] == version
        versioned_meta = await http.get(f"/v2/models/intent/versions/{version}")
        assert versioned_meta.status_code == 200 and versioned_meta.json()["versions"] == [version]
        ready = await http.get(f"/v2/models/intent/versions/{version}/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True and ready.headers["x-edgeplane-site"]
        listed = (await http.get("/v1/endpoints/intent")).json()["endpoints"]
        assert listed and all(e["version"] == version for e in listed), listed  # as each agent reports the file it serves


async def test_a_version_the_model_does_not_have_is_404_naming_its_versions(fleet: harness.Fleet,
                                                                             model: tuple[pathlib.Path, onnx_models.BuiltModel]) -> None:
    version = version_of(model)
    async with httpx.AsyncClient(base_url=url_of(fleet), timeout=30) as http:
        answers = [await http.post("/v2/models/intent/versions/7/infer", json=BODY),
                   await http.get("/v2/models/intent/versions/7"),
                   await http.get("/v2/models/intent/versions/7/ready")]
    for resp in answers:
        assert resp.status_code == 404, resp.text
        error = resp.json()["error"]
        assert error == f"model 'intent' has no version '7' (versions served: {version})"  # said by the gateway: no replica has it
    assert fleet.cp is not None and all(e.healthy for e in fleet.cp.table.endpoints("intent"))
    assert not fleet.cp.table.ejected()  # a version refused is no failure of the replica


async def test_the_agent_checks_the_version_it_is_asked_for(fleet: harness.Fleet, model: tuple[pathlib.Path, onnx_models.BuiltModel]) -> None:
    version = version_of(model)
    async with httpx.AsyncClient(base_url=fleet.agents["edge-paris"].url, timeout=30) as http:
        assert (await http.post(f"/v2/models/intent/versions/{version}/infer", json=BODY)).status_code == 200
        assert (await http.get(f"/v2/models/intent/versions/{version}")).json()["versions"] == [version]
        assert (await http.get(f"/v2/models/intent/versions/{version}/ready")).json() == {"name": "intent", "ready": True}
        wrong = [await http.post("/v2/models/intent/versions/1/infer", json=BODY), await http.get("/v2/models/intent/versions/1"),
                 await http.get("/v2/models/intent/versions/1/ready")]
        not_allowed = await http.get(f"/v2/models/intent/versions/{version}/infer")
    for resp in wrong:
        assert resp.status_code == 404
        assert resp.json() == {"error": f"model 'intent' has no version '1'; its versions: {version}"}
    assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "POST"


@pytest.mark.parametrize(("datatype", "data"), [("FP32", [True] + [0.1] * 7), ("FP32", [[0.1] * 7 + [False]])])
async def test_booleans_are_no_data_of_a_number_tensor(fleet: harness.Fleet, datatype: str, data: list[Any]) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": datatype, "data": data}]}
    async with httpx.AsyncClient(base_url=url_of(fleet), timeout=30) as http:
        resp = await http.post("/v2/models/intent/infer", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith(f"inputs[0] 'input': {datatype} data must be numbers, not JSON booleans (true/false)")


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v2/models/intent/infer", "POST"),
    ("GET", "/v2/models/intent/versions/1/infer", "POST"),
    ("POST", "/v2/models/intent/ready", "GET, HEAD"),
    ("POST", "/v1/endpoints/intent", "GET, HEAD"),
])  # the OpenAI routes answer with OpenAI's error object: tests/gateway/test_openai_bad_input_gateway.py
async def test_the_standalone_gateway_answers_a_wrong_method_with_405(gateway: gatewayd.StandaloneGateway, method: str, path: str,
                                                                      allow: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as http:
        resp = await http.request(method, path)
        unknown = await http.get("/v9/nothing")
    assert resp.status_code == 405 and resp.headers["allow"] == allow
    assert resp.json() == {"error": f"{method} is not allowed on {path}; it takes {allow}", "reason": "MethodNotAllowed"}
    assert unknown.status_code == 404 and unknown.json() == {"error": "no route for GET /v9/nothing", "reason": "NoRoute"}


@pytest.mark.parametrize(("params", "status", "message"), [
    ({"lat": "999", "lon": "0"}, 400, "query parameter lat must be a number in [-90, 90], not '999'"),
    ({"lat": "1"}, 400, "query parameter lat is given without lon"),
    ({"region": "atlantis"}, 400, "query parameter region: unknown region 'atlantis' (known regions: de, fr, no); give lat and lon instead"),
    ({"region": "no"}, 200, ""),
    ({"lat": "59.9", "lon": "10.7"}, 200, ""),
])
async def test_the_standalone_gateways_endpoint_list_refuses_what_it_cannot_read(gateway: gatewayd.StandaloneGateway, params: dict[str, str],
                                                                                 status: int, message: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as http:
        resp = await http.get("/v1/endpoints/intent", params=params)
    assert resp.status_code == status, resp.text
    if status == 400:
        assert resp.json()["error"].startswith(message)
    else:
        assert resp.json()["endpoints"][0]["site"] == "edge-berlin"
