"""Text and numbers the store cannot hold, over real HTTP, on SQLite and on PostgreSQL alike:
a NUL in a path or query and an event id past 64 bits were 500s (PostgreSQL refuses NUL in
text; neither backend takes an integer of more than 64 bits), a record id or token
description holding a NUL reached PostgreSQL as a failed write, and one holding a lone
surrogate neither backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from orchestrator.api import auth
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

NUL = "the request's path or query holds a NUL character, which no name or value here may hold"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    store = None if request.param == "sqlite" else {"store": request.getfixturevalue("postgres").create_database()}
    fleet = harness.Fleet(tmp_path_factory.mktemp(request.param))
    try:
        cp = await fleet.start_control_plane(**(store or {}))
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as client:
            yield client
    finally:
        await fleet.stop()


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/sites/a%00b"),
    ("DELETE", "/v1/sites/a%00b"),
    ("GET", "/v1/events?name=a%00b"),
    ("GET", "/v1/events?kind=site&name=%00"),
    ("GET", "/v1/cascades/a%00"),
    ("GET", "/v1/endpoints/a%00"),
    ("GET", "/v1/endpoints?watch=%00"),
    ("POST", "/v1/revoke/tokens/a%00"),
    ("POST", "/v1/revoke/agents/a%00"),
    ("POST", "/v1/wake/a%00"),
    ("POST", "/v1/distill/a%00"),
    ("GET", "/v1/captures/eu?deployment=a%00"),
    ("DELETE", "/v1/captures/eu/a%00"),
])
async def test_a_nul_in_a_path_or_query_is_a_400_on_either_store(api: httpx.AsyncClient, method: str, path: str) -> None:
    resp = await api.request(method, path)
    assert (resp.status_code, resp.json()) == (400, {"error": NUL, "reason": "BadRequest"}), resp.text
    assert (await api.get("/v1/events?last=1")).status_code == 200  # and the API goes on


async def test_an_event_id_past_64_bits_reads_as_past_the_last(api: httpx.AsyncClient) -> None:
    every = (await api.get("/v1/events")).json()["items"]
    assert every  # the admin token made at start
    huge = "9" * 25
    assert (await api.get(f"/v1/events?since={huge}")).json()["items"] == []
    assert (await api.get(f"/v1/events?since=-{huge}")).json()["items"] == every
    for count in ("limit", "last"):  # more than a page holds: a 400 saying so, not a 500
        refused = await api.get(f"/v1/events?{count}={huge}")
        assert refused.status_code == 400 and refused.json()["error"].startswith(f"{count} must be a whole number from")


async def test_a_token_description_with_a_nul_is_kept_escaped(api: httpx.AsyncClient) -> None:
    made = await api.post("/v1/tokens", json={"purpose": "api", "role": "read", "description": "ci\x00bot"})
    assert made.status_code == 201, made.text
    listed = {t["id"]: t["description"] for t in (await api.get("/v1/tokens")).json()["items"]}
    assert listed[made.json()["id"]] == "ci\\x00bot"


async def test_a_token_description_with_a_lone_surrogate_is_kept_escaped(api: httpx.AsyncClient) -> None:
    """JSON's ``\\ud800`` is a lone surrogate, which neither backend can encode: it was a 500."""
    made = await api.post("/v1/tokens", content=b'{"purpose": "api", "role": "read", "description": "x\\ud800y"}',
                          headers={"content-type": "application/json"})
    assert made.status_code == 201, made.text
    listed = {t["id"]: t["description"] for t in (await api.get("/v1/tokens")).json()["items"]}
    assert listed[made.json()["id"]] == "x\\ud800y"
    events = (await api.get("/v1/events?kind=Token&last=1")).json()["items"]
    assert events[-1]["reason"] == "x\\ud800y"


@pytest.mark.parametrize("role", ["\x00", "admin", "", 7])
async def test_a_bootstrap_token_of_another_role_than_agent_is_refused(api: httpx.AsyncClient, role: object) -> None:
    """Its role was stored as given: a NUL in it was a 500 on PostgreSQL (the API fuzzer)."""
    made = await api.post("/v1/tokens", json={"purpose": "bootstrap", "role": role})
    assert (made.status_code, made.json()) == (400, {"error": "a bootstrap token's role is 'agent'", "reason": "BadRequest", "field": "role"}), made.text
    assert (await api.post("/v1/tokens", json={"purpose": "bootstrap", "role": "agent"})).status_code == 201


async def test_a_bootstrap_token_without_an_expiry_is_refused(api: httpx.AsyncClient) -> None:
    """``"ttlSeconds": null`` made one that never expired: only static bootstrap tokens do."""
    made = await api.post("/v1/tokens", json={"purpose": "bootstrap", "ttlSeconds": None})
    assert (made.status_code, made.json()) == (400, {"error": "a bootstrap token expires: give ttlSeconds, or leave it out for an hour",
                                                           "reason": "BadRequest", "field": "ttlSeconds"})
    assert (await api.post("/v1/tokens", json={"purpose": "bootstrap"})).json()["expiresAt"] is not None
    assert (await api.post("/v1/tokens", json={"purpose": "api", "role": "read", "ttlSeconds": None})).json()["expiresAt"] is None


async def test_every_guarded_route_answers_503_while_the_token_store_does_not_answer(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch, capture and distillation routes and whoami gave 500 there; the others 503."""
    fleet = harness.Fleet(tmp_path_factory.mktemp("down"))
    try:
        cp = await fleet.start_control_plane()

        def unreachable(secret: str, purpose: str) -> None:
            raise store_mod.StoreUnavailable("cannot reach the PostgreSQL store at db: connection refused")

        monkeypatch.setattr(cp.store, "verify_token", unreachable)
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30, headers={"authorization": "Bearer ep_x"}) as http:
            for method, path in (("GET", "/v1/sites"), ("GET", "/v1/endpoints"), ("GET", "/v1/whoami"), ("POST", "/v1/wake/m"),
                                 ("GET", "/v1/captures/eu"), ("POST", "/v1/distill/d")):
                resp = await http.request(method, path)
                assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1, (path, resp.text)
                assert resp.json()["error"] == auth.STORE_UNAVAILABLE, path  # where the database is: for the log, not this caller
    finally:
        await fleet.stop()
