"""Every route of the control API refuses a query parameter it does not read (400, naming
it), over real HTTP against a real control plane: read as nothing, a parameter an
integrator misspelt or put in the query where a header or the body was meant (a token's
``?role=admin``, a revocation's ``?reason=``) did something other than what was asked,
and said nothing."""

from __future__ import annotations


import httpx
import pytest

from . import support


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/tokens", b'{"purpose": "api"}'),
    ("POST", "/v1/revoke/tokens/no-such-token", b""),
    ("POST", "/v1/revoke/agents/no-such-site", b""),
    ("POST", "/v1/wake/intent", b""),
    ("GET", "/v1/whoami", b""),
    ("POST", "/v1/distill/no-such-deployment", b""),
])
def test_a_parameter_the_route_does_not_read_is_refused_and_does_nothing(api: httpx.Client, method: str, path: str, body: bytes) -> None:
    tokens = len(api.get("/v1/tokens").json()["items"])
    last = api.get("/v1/events", params={"last": 1}).json()["lastId"]
    r = api.request(method, path, params={"role": "admin", "reason": "leaked"}, content=body)
    assert r.status_code == 400, r.text
    assert "unknown query parameter 'reason', 'role'" in r.json()["error"]
    assert len(api.get("/v1/tokens").json()["items"]) == tokens
    assert api.get("/v1/events", params={"last": 1}).json()["lastId"] == last


@pytest.mark.parametrize(("method", "query"), [
    ("POST /v1/apply", "dryRun=true&dryRun=false"),
    ("POST /v1/delete", "ignoreNotFound=false&ignoreNotFound=true"),
    ("DELETE /v1/sites/twice", "resourceVersion=1&resourceVersion=2"),
    ("DELETE /v1/sites/twice", "resourceVersion=1&resourceVersion=x"),
    ("POST /v1/sites/twice/drain", "dryRun=true&dryRun=false"),
    ("GET /v1/sites", "limit=1&limit=2"),
    ("GET /v1/events", "last=1&last=5"),
    ("GET /v1/endpoints/twice", "region=eu-west&region=us-east"),
])
def test_a_parameter_given_twice_is_refused_and_does_nothing(api: httpx.Client, method: str, query: str) -> None:
    """Which of two values counts is each server's own rule (Starlette's is the last, many
    proxies' the first): ``?dryRun=true&dryRun=false`` applied for real."""
    site = support.doc("Site", "twice", support.edge_site_spec())
    assert api.post("/v1/apply", content=site).status_code == 200
    before = api.get("/v1/sites/twice").json()["metadata"]["resourceVersion"]
    verb, path = method.split(" ")
    changed = support.doc("Site", "twice", {**support.edge_site_spec(), "energy": {"carbonGramsPerKWh": 7}})
    r = api.request(verb, f"{path}?{query}", content=changed if verb == "POST" else None)
    assert r.status_code == 400, r.text
    name = query.split("=")[0]
    assert f"query parameter {name!r} is given 2 times" in r.json()["error"]
    site_now = api.get("/v1/sites/twice").json()
    assert site_now["metadata"]["resourceVersion"] == before and "schedulable" not in site_now["status"]
