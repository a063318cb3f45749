"""API-token checks run off the event loop and keep their verdicts a few seconds: a database
that stalls holds up the requests that wait on it, not the process; the gateway's hot path
reads a kept verdict; a revocation through this process is refused at once all the same."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from dataclasses import dataclass

import httpx
import pytest
from starlette.requests import Request

from orchestrator.security import admission, ratelimit, tokencache
from orchestrator.testing import harness, stall
from orchestrator.testing.postgres import PostgresServer


@dataclass(frozen=True)
class Info:
    id: str
    expires_at: float | None = None


class Lookups:
    """The store's side of a token check, counted; ``gate`` set: each lookup reads, then waits for it."""

    def __init__(self, valid: dict[str, Info]) -> None:
        self.valid, self.asked = valid, 0
        self.gate: threading.Event | None = None
        self.failing: Exception | None = None

    def __call__(self, secret: str) -> Info | None:
        self.asked += 1
        found = self.valid.get(secret)  # read, then slow to come back
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.failing is not None:
            raise self.failing
        return found


def verdicts(lookups: Lookups, now: list[float], **options: float) -> tokencache.TokenVerdicts[Info]:
    return tokencache.TokenVerdicts(lambda secret: asyncio.to_thread(lookups, secret), clock=lambda: now[0], wall=lambda: now[0], **options)  # type: ignore[arg-type]


async def test_a_verdict_is_kept_ttl_seconds_and_no_longer_than_the_token_lives() -> None:
    now = [1000.0]
    lookups = Lookups({"a": Info("a"), "b": Info("b", expires_at=1002.0)})
    tokens = verdicts(lookups, now, ttl_s=5.0)
    assert [await tokens.verify(s) for s in ("a", "a", "b", "nope", "nope")] == [Info("a"), Info("a"), Info("b", 1002.0), None, None]
    assert lookups.asked == 3  # one per token, refused ones too
    now[0] += 3.0  # b has expired: asked again; a is still kept
    lookups.valid.pop("b")
    assert (await tokens.verify("a"), await tokens.verify("b"), lookups.asked) == (Info("a"), None, 4)
    now[0] += 2.5  # past the ttl: asked again
    assert (await tokens.verify("a"), lookups.asked) == (Info("a"), 5)


async def test_callers_with_one_token_share_one_lookup_and_a_failure_is_not_kept() -> None:
    now = [0.0]
    lookups = Lookups({"a": Info("a")})
    tokens = verdicts(lookups, now)
    lookups.gate = threading.Event()
    waiting = [asyncio.ensure_future(tokens.verify("a")) for _ in range(20)]
    await asyncio.sleep(0.05)
    lookups.gate.set()
    assert await asyncio.gather(*waiting) == [Info("a")] * 20 and lookups.asked == 1
    lookups.gate, lookups.failing = None, ConnectionError("the store does not answer")
    with pytest.raises(ConnectionError):
        await tokens.verify("b")
    lookups.failing = None
    assert await tokens.verify("b") is None and lookups.asked == 3


async def test_forget_makes_every_verdict_stale_and_one_looked_up_before_it_is_not_kept() -> None:
    now = [0.0]
    lookups = Lookups({"a": Info("a")})
    tokens = verdicts(lookups, now)
    assert await tokens.verify("a") == Info("a")
    lookups.gate = threading.Event()
    tokens.forget()
    before = asyncio.ensure_future(tokens.verify("a"))  # reads the store before the revocation commits...
    await asyncio.sleep(0.05)
    tokens.forget()  # ...which the revoking request then announces
    del lookups.valid["a"]
    lookups.gate.set()
    assert await before == Info("a")  # it raced the revocation
    lookups.gate = None
    assert await tokens.verify("a") is None  # but its verdict was not kept


async def test_the_verdicts_kept_are_bounded_and_made_up_tokens_push_out_no_valid_one() -> None:
    now = [0.0]
    lookups = Lookups({"a": Info("a"), "b": Info("b"), "c": Info("c")})
    tokens = verdicts(lookups, now, max_entries=2, max_refused=2)
    for secret in ("a", "b", *(f"guess{i}" for i in range(100))):
        await tokens.verify(secret)
    assert lookups.asked == 102
    assert (await tokens.verify("a"), await tokens.verify("b"), lookups.asked) == (Info("a"), Info("b"), 102)  # still kept
    assert (await tokens.verify("guess0"), lookups.asked) == (None, 103)  # refusals push out refusals
    await tokens.verify("a")  # used: the most recently used
    await tokens.verify("c")  # a third valid token pushes out the least recently used one, b
    assert (await tokens.verify("a"), lookups.asked) == (Info("a"), 104)
    assert (await tokens.verify("b"), lookups.asked) == (Info("b"), 105)


async def test_a_token_known_valid_is_told_without_a_lookup_until_it_expires() -> None:
    now = [1000.0]
    lookups = Lookups({"a": Info("a"), "b": Info("b", expires_at=1010.0)})
    tokens = verdicts(lookups, now, ttl_s=5.0)
    assert [tokens.known(s) for s in ("a", "b", "nope")] == [None, None, None]  # never seen
    for secret in ("a", "b", "nope"):
        await tokens.verify(secret)
    now[0] += 6.0  # past the ttl: still known, asked again by the next verify
    assert [tokens.known(s) for s in ("a", "b", "nope")] == [Info("a"), Info("b", 1010.0), None]
    now[0] += 5.0  # b has expired
    assert (tokens.known("b"), lookups.asked) == (None, 3)


async def test_valid_clients_behind_one_proxy_are_not_rate_limited_by_its_address_after_a_revocation() -> None:
    """A revocation makes every verdict stale, but the tokens in use are still known valid:
    each takes from its own bucket, and only its next check asks the store again (so the
    revoked token is refused at once all the same)."""
    now = [0.0]
    lookups = Lookups({"good1": Info("good1"), "good2": Info("good2"), "revoked": Info("revoked")})
    tokens = verdicts(lookups, now)
    gateway = admission.GatewayAdmission(ratelimit.RateLimiter(ratelimit.RateLimit(0.01, 3)), tokens.verify, tokens.known)

    async def status(secret: str) -> int:
        request = Request({"type": "http", "method": "POST", "path": "/", "client": ("10.0.0.9", 1),
                           "headers": [(b"authorization", f"Bearer {secret}".encode())]})
        refused = await gateway.check(request)
        return 200 if refused is None else refused.status_code

    assert [await status(s) for s in ("good1", "good2", "revoked")] == [200] * 3  # the proxy's burst: their first checks
    del lookups.valid["revoked"]
    tokens.forget()
    assert [await status(s) for s in ("good1", "good2", "good1", "revoked")] == [200, 200, 200, 401]
    assert lookups.asked == 6  # each asked once again after the revocation


async def test_a_token_revoked_through_this_control_plane_is_refused_at_once(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(auth="token", gateway_auth="token")
        admin = {"authorization": f"Bearer {cp.admin_token}"}
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            made = (await http.post("/v1/tokens", json={"purpose": "api", "role": "read"}, headers=admin)).json()
            reader = {"authorization": f"Bearer {made['token']}"}
            for _ in range(2):  # the second answered from the kept verdict
                assert (await http.get("/v1/sites", headers=reader)).status_code == 200
                assert (await http.get("/v2/models/m", headers=reader)).status_code == 404  # admitted; no such model
                assert (await http.get("/v1/whoami", headers=reader)).json()["id"] == made["id"]
            assert (await http.post(f"/v1/revoke/tokens/{made['id']}", headers=admin)).status_code == 200
            assert (await http.get("/v1/sites", headers=reader)).status_code == 401
            assert (await http.get("/v2/models/m", headers=reader)).status_code == 401
            assert (await http.get("/v1/whoami", headers=reader)).status_code == 401
    finally:
        await fleet.stop()


async def test_a_token_lookup_stalled_in_the_database_holds_up_no_other_request(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """Checked on the event loop, one token lookup waiting on a stalled database (its server
    process stopped here; a frozen VM alike) froze the process: the liveness probe too."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(store=postgres.create_database(), auth="token", gateway_auth="token")
        api_token, _ = cp.store.create_token("api", "read", None, "test", "dashboards")
        gateway_token, _ = cp.store.create_token("api", "read", None, "test", "app")
        pid = cp.store.backend_pid
        assert pid

        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            with stall.stalled(pid) as database:
                probing = stall.probe([f"{cp.http_url}/v2/health/live"], within=3, then=database.resume)  # starts at once
                stalled = await asyncio.gather(http.get("/v1/whoami", headers={"authorization": f"Bearer {api_token}"}),
                                               http.get("/v2/models/m", headers={"authorization": f"Bearer {gateway_token}"}))
                [live] = await probing
        assert live == 200, "the liveness probe got no answer while a token lookup waited on the database"
        assert [r.status_code for r in stalled] == [200, 404]  # answered once the database is back
    finally:
        await fleet.stop()
