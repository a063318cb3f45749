"""The standalone gateway (``edgeplane gateway``) checking API tokens with a real control
plane: what it caches and for how long, by whose clock, and what it does while no control
plane answers. Each test starts its own control plane (or a stand-in whoami on loopback);
the fleet the gateway follows is in ``test_standalone_gateway.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestrator.gateway import endpoints
from orchestrator.gatewayd import follow
from orchestrator.gatewayd import server as gatewayd
from orchestrator.ports import free_port
from orchestrator.testing import harness, loopback
from tests import token_lookups

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}


async def test_made_up_tokens_are_limited_by_address_before_the_control_plane_is_asked(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new made-up token used to be a GET /v1/whoami (a store lookup on the control
    plane) however low --gateway-rate was, and was never answered 429."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        secret, _ = cp.store.create_token("api", "read", None, "test", "app")
        looked_up = token_lookups.counted(monkeypatch, cp.store)
        config = gatewayd.GatewayConfig(control_planes=(cp.http_url,), port=0, gateway_auth="token", gateway_rate=0.01, gateway_burst=3.0)
        gw = await gatewayd.StandaloneGateway(config).start()
        try:
            assert await gw.follower.wait_snapshot(0, 60)
            async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
                ok = {"authorization": f"Bearer {secret}"}
                assert (await http.post("/v2/models/m/infer", json=BODY, headers=ok)).status_code == 404
                codes = [(await http.post("/v2/models/m/infer", json=BODY, headers={"authorization": f"Bearer ep_guess{i}"})).status_code
                         for i in range(40)]
                assert codes == [401, 401] + [429] * 38, codes
                assert (await http.post("/v2/models/m/infer", json=BODY, headers=ok)).status_code == 404  # its own bucket
        finally:
            await gw.stop()
        assert looked_up == [secret, "ep_guess0", "ep_guess1"]
    finally:
        await fleet.stop()


async def test_a_control_plane_with_auth_needs_the_gateways_token(tmp_path: Any) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(auth="token")
        assert cp.admin_token
        config = gatewayd.GatewayConfig(control_planes=(cp.http_url,), port=0, backoff_max_s=0.5)
        without = await gatewayd.StandaloneGateway(config).start()
        try:
            await harness.wait_until(lambda: without.follower.last_error, 30, what="the refused watch to be reported")
            assert "HTTP 401" in str(without.follower.last_error) and not without.follower.ready
        finally:
            await without.stop()
        # a standalone gateway is not a control plane: following one says so
        config = gatewayd.GatewayConfig(control_planes=(cp.http_url,), port=0, token=cp.admin_token)
        first = await gatewayd.StandaloneGateway(config).start()
        try:
            assert await first.follower.wait_snapshot(0, 60)
            second = await gatewayd.StandaloneGateway(dataclasses.replace(config, control_planes=(first.http_url,))).start()
            try:
                await harness.wait_until(lambda: second.follower.last_error, 30, what="the refused watch to be reported")
                assert "HTTP 404" in str(second.follower.last_error) and "is it an edgeplane control plane" in str(second.follower.last_error)
            finally:
                await second.stop()
        finally:
            await first.stop()
        with_token = await gatewayd.StandaloneGateway(dataclasses.replace(config, token=cp.admin_token)).start()
        try:
            assert await with_token.follower.wait_snapshot(0, 60), with_token.follower.status()
            assert with_token.follower.epoch == cp.publisher.epoch
        finally:
            await with_token.stop()
    finally:
        await fleet.stop()


async def test_token_checks_are_cached_and_outlive_the_control_plane(tmp_path: Any) -> None:
    now = [0.0]
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            token = (await http.post("/v1/tokens", json={"purpose": "api", "role": "read"})).json()["token"]
        follower = follow.TableFollower([f"http://127.0.0.1:{free_port()}", cp.http_url], endpoints.EndpointTable())
        checker = follow.TokenChecker(follower, clock=lambda: now[0])
        try:
            verdicts = await asyncio.gather(*(checker.check(token) for _ in range(20)))  # the dead URL is skipped
            assert len({v.id for v in verdicts if v is not None}) == 1 and None not in verdicts
            assert await checker.check("wrong") is None
            await cp.stop()
            fleet.cp = None
            now[0] += 3600  # every entry is stale and no control plane answers
            assert await checker.check(token) == verdicts[0]  # known valid: stays valid
            with pytest.raises(follow.Unverifiable):
                await checker.check("wrong")  # known invalid, or never seen: nobody can tell now
        finally:
            await checker.close()
            await follower.close()
    finally:
        await fleet.stop()


async def test_a_token_past_its_expiry_is_refused_whether_or_not_the_control_plane_answers(tmp_path: Any) -> None:
    """A valid verdict is kept 30 s, and past that while no control plane answers: never past
    the token's own expiry (``expiresInSeconds`` in ``GET /v1/whoami``). The gateway and the
    control plane (its store's time) share one injected clock."""
    mono, wall = [0.0], [time.time()]
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(wall=lambda: wall[0])
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            made = [(await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "ttlSeconds": ttl})).json()
                    for ttl in (20, 3600)]
            whoami = (await http.get("/v1/whoami", headers={"authorization": f"Bearer {made[0]['token']}"})).json()
            assert whoami["expiresAt"] == made[0]["expiresAt"]
        short, long = (m["token"] for m in made)
        follower = follow.TableFollower([cp.http_url], endpoints.EndpointTable())
        checker = follow.TokenChecker(follower, clock=lambda: mono[0], wall=lambda: wall[0])
        try:
            assert await checker.check(short) is not None and await checker.check(long) is not None

            def elapse(seconds: float) -> None:
                mono[0] += seconds
                wall[0] += seconds

            elapse(21)  # within the 30 s a verdict is kept, but past the short token's expiry
            assert await checker.check(short) is None
            assert await checker.check(long) is not None
            await cp.stop()
            fleet.cp = None
            elapse(3600)  # no control plane answers, and the long token has expired too
            assert await checker.check(long) is None
        finally:
            await checker.close()
            await follower.close()
    finally:
        await fleet.stop()


@pytest.mark.parametrize("gateway_off_s", [2 * 3600.0, -2 * 3600.0], ids=["gateway-two-hours-ahead", "gateway-two-hours-behind"])
async def test_a_gateway_whose_clock_is_hours_off_holds_a_token_to_its_expiry_by_the_control_planes_time(
        tmp_path: Any, gateway_off_s: float) -> None:
    """The gateway compared the token's ``expiresAt`` with its own clock: two hours ahead, it
    refused a one-hour token the control plane took; two hours behind, it held one valid two
    hours past its expiry while no control plane answered. It now counts the life the control
    plane says is left (``expiresInSeconds``, on the store's time) on its monotonic clock."""
    mono = [0.0]
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            token = (await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "ttlSeconds": 3600})).json()["token"]
        follower = follow.TableFollower([cp.http_url], endpoints.EndpointTable())
        checker = follow.TokenChecker(follower, clock=lambda: mono[0], wall=lambda: time.time() + gateway_off_s)
        try:
            assert await checker.check(token) is not None
            await cp.stop()
            fleet.cp = None
            mono[0] += 3500  # no control plane answers: held while it lives
            assert await checker.check(token) is not None
            mono[0] += 200  # and not past its expiry
            assert await checker.check(token) is None
        finally:
            await checker.close()
            await follower.close()
    finally:
        await fleet.stop()


async def test_while_no_control_plane_answers_a_token_known_valid_is_asked_about_after_a_pause_not_on_each_request() -> None:
    """A token known valid stays valid while no control plane answers, but every request
    with it asked each control plane again first: a control plane whose store was down got
    one whoami per request, and behind a partition every request waited out the timeouts
    (5 s a silent control plane). It is asked about again after a pause instead."""
    now = [0.0]
    asked: list[str] = []

    async def whoami(request: Request) -> Response:
        asked.append(request.headers["authorization"])
        if down:
            return JSONResponse({"error": "the store does not answer"}, status_code=503)
        return JSONResponse({"id": "t1", "expiresAt": None})

    down = False
    app = Starlette(routes=[Route("/v1/whoami", whoami)])
    async with loopback.serving(app) as port:
        follower = follow.TableFollower([f"http://127.0.0.1:{port}"], endpoints.EndpointTable())
        checker = follow.TokenChecker(follower, clock=lambda: now[0], ttl_s=30.0, retry_s=5.0)
        try:
            assert await checker.check("tok") == follow.Token("t1") and len(asked) == 1
            down, now[0] = True, 31.0  # stale, and the control plane's store is down
            assert [await checker.check("tok") for _ in range(3)] == [follow.Token("t1")] * 3
            assert len(asked) == 2  # asked once; then held, not asked, for the pause
            now[0] = 36.0
            assert await checker.check("tok") == follow.Token("t1") and len(asked) == 3
            down, now[0] = False, 41.0
            assert await checker.check("tok") == follow.Token("t1") and len(asked) == 4  # answered: kept 30 s again
            now[0] = 70.0
            assert await checker.check("tok") == follow.Token("t1") and len(asked) == 4
        finally:
            await checker.close()
            await follower.close()


async def test_the_endpoint_lists_refusals_name_their_reason_as_the_control_planes_do(tmp_path: Any) -> None:
    """A standalone gateway's ``GET /v1/endpoints/MODEL`` is the control plane's route: its
    503 before the first table and its token and rate refusals answered ``{"error": ...}``
    alone there, where the control plane's own answered with ``reason`` too."""
    unready = await gatewayd.StandaloneGateway(gatewayd.GatewayConfig(control_planes=(f"http://127.0.0.1:{free_port()}",), port=0)).start()
    try:
        async with httpx.AsyncClient(base_url=unready.http_url, timeout=30) as http:
            resp = await http.get("/v1/endpoints/m")
        assert resp.status_code == 503 and resp.headers["retry-after"] == "2", resp.text
        assert resp.json()["reason"] == "ServiceUnavailable" and "no endpoint table" in resp.json()["error"], resp.text
    finally:
        await unready.stop()
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        config = gatewayd.GatewayConfig(control_planes=(cp.http_url,), port=0, gateway_auth="token", gateway_rate=0.01, gateway_burst=1.0)
        gw = await gatewayd.StandaloneGateway(config).start()
        try:
            assert await gw.follower.wait_snapshot(0, 60)
            async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
                refused = await http.get("/v1/endpoints/m")
                limited = await http.get("/v1/endpoints/m")
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", refused.text
            assert refused.json()["reason"] == "Unauthorized", refused.text
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1, limited.text
            assert limited.json()["reason"] == "TooManyRequests", limited.text
        finally:
            await gw.stop()
    finally:
        await fleet.stop()
