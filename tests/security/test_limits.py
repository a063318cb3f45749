"""Limits: per-client gateway rate, gateway auth, body sizes, tensor sizes, objects per apply."""

from __future__ import annotations

import pathlib

import grpc
import httpx
import pytest

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator import server, server_config
from orchestrator.cli import main as cli_main
from orchestrator.gatewayd import server as gatewayd
from orchestrator.security import ratelimit
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from tests import token_lookups


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("rate", "burst", "steps", "expected"),
    [
        # steps: (advance seconds, key); expected: None = allowed, float = Retry-After seconds
        (0, 0, [(0, "a")] * 5, [None] * 5),  # rate 0 = no limit
        (1, 2, [(0, "a"), (0, "a"), (0, "a")], [None, None, 1.0]),
        (2, 1, [(0, "a"), (0, "a"), (0.5, "a")], [None, 0.5, None]),
        (1, 1, [(0, "a"), (0, "b"), (0, "a"), (0, "b")], [None, None, 1.0, 1.0]),  # keys are independent
        (10, 10, [(0, "a")] * 10 + [(0, "a"), (1.0, "a")], [None] * 10 + [0.1, None]),
        (1, 3, [(0, "a"), (100, "a"), (0, "a"), (0, "a"), (0, "a")], [None, None, None, None, 1.0]),  # refill capped at burst
    ],
)
def test_token_bucket(rate: float, burst: float, steps: list[tuple[float, str]], expected: list[float | None]) -> None:
    clock = FakeClock()
    limiter = ratelimit.RateLimiter(ratelimit.RateLimit(rate, burst), clock=clock)
    got = []
    for advance, key in steps:
        clock.now += advance
        wait = limiter.take(key)
        got.append(None if wait is None else round(wait, 6))
    assert got == expected


def test_bucket_table_is_bounded() -> None:
    limiter = ratelimit.RateLimiter(ratelimit.RateLimit(1, 1), clock=FakeClock(), max_clients=100)
    for i in range(1000):
        limiter.take(f"addr:{i}")
    assert len(limiter) == 100


@pytest.mark.parametrize("limit", [ratelimit.RateLimit(-1, 0), ratelimit.RateLimit(10, 0.5), ratelimit.RateLimit(1e-320, 0)])
def test_a_limit_that_cannot_work_is_refused(limit: ratelimit.RateLimit) -> None:
    with pytest.raises(ValueError):
        ratelimit.RateLimiter(limit)


async def _control_plane(tmp_path: pathlib.Path, **overrides: object) -> harness.Fleet:
    fleet = harness.Fleet(tmp_path)
    await fleet.start_control_plane(**overrides)
    return fleet


async def test_gateway_rate_limit_answers_429_with_retry_after(tmp_path: pathlib.Path) -> None:
    fleet = await _control_plane(tmp_path, gateway_rate=1.0, gateway_burst=3.0)
    try:
        assert fleet.cp is not None
        async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
            codes = [(await http.post("/v2/models/nope/infer", content=b"{}")).status_code for _ in range(3)]
            assert codes == [404, 404, 404]  # admitted, then routed: no such model
            limited = await http.post("/v2/models/nope/infer", content=b"{}")
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert "rate limit" in limited.json()["error"]
            # health probes are never limited
            assert (await http.get("/v2/health/live")).status_code == 200
            # the control API is not the gateway: not limited either
            assert (await http.get("/v1/sites")).status_code == 200
    finally:
        await fleet.stop()


async def test_the_slowest_rate_asks_a_client_to_come_back_in_a_day_at_most(tmp_path: pathlib.Path) -> None:
    fleet = await _control_plane(tmp_path, gateway_rate=1e-6)  # the slowest: one request in 11.6 days
    try:
        assert fleet.cp is not None
        async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
            assert (await http.post("/v2/models/nope/infer", content=b"{}")).status_code == 404
            limited = await http.post("/v2/models/nope/infer", content=b"{}")
            assert limited.status_code == 429 and limited.headers["retry-after"] == "86400"
    finally:
        await fleet.stop()


@pytest.mark.parametrize("command", [["serve"], ["gateway", "--control-plane", "http://127.0.0.1:9"]])
def test_a_gateway_rate_too_slow_to_wait_for_is_refused_on_the_command_line(
        command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """1e-320 requests/s is a number, but a client's wait for it overflows (a 500 on its second request)."""
    parser = cli_main.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--gateway-rate", "1e-320"])
    assert "--gateway-rate" in capsys.readouterr().err
    assert parser.parse_args([*command, "--gateway-rate", "0"]).gateway_rate == 0.0  # no limit
    assert parser.parse_args([*command, "--gateway-rate", "1e-6"]).gateway_rate == 1e-6


async def test_gateway_token_auth(tmp_path: pathlib.Path) -> None:
    fleet = await _control_plane(tmp_path, gateway_auth="token", gateway_rate=0.01, gateway_burst=4.0)
    try:
        cp = fleet.cp
        assert cp is not None
        secret, _ = cp.store.create_token("api", "read", None, "test", "app")
        bootstrap, _ = cp.store.create_token("bootstrap", "agent", 60, "test", "agent")
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            ok = {"authorization": f"Bearer {secret}"}
            assert (await http.post("/v2/models/m/infer", content=b"{}", headers=ok)).status_code == 404
            assert (await http.post("/v2/models/m/infer", content=b"{}")).status_code == 401
            bad = await http.post("/v2/models/m/infer", content=b"{}", headers={"authorization": "Bearer nope"})
            assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
            # a bootstrap token is for agents, not for the gateway
            assert (await http.get("/v2/models/m", headers={"authorization": f"Bearer {bootstrap}"})).status_code == 401
            # the address's burst of 4 is spent (the valid token's first check and three refusals)...
            assert (await http.get("/v2/models/m", headers={"authorization": "Bearer nope"})).status_code == 429
            # ...the token's is its own: its fifth request is limited
            assert [(await http.get("/v2/models/m/ready", headers=ok)).status_code for _ in range(4)] == [404, 404, 404, 429]
            assert (await http.get("/v2/health/ready")).status_code == 200
    finally:
        await fleet.stop()


async def test_made_up_tokens_are_limited_by_address_before_they_cost_a_lookup(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new made-up token used to be looked up in the store before the rate limit was
    asked, and refused (401) without ever being limited."""
    fleet = await _control_plane(tmp_path, gateway_auth="token", gateway_rate=0.01, gateway_burst=3.0)
    try:
        cp = fleet.cp
        assert cp is not None
        secret, _ = cp.store.create_token("api", "read", None, "test", "app")
        looked_up = token_lookups.counted(monkeypatch, cp.store)
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            ok = {"authorization": f"Bearer {secret}"}
            assert (await http.post("/v2/models/m/infer", content=b"{}", headers=ok)).status_code == 404
            codes = [(await http.post("/v2/models/m/infer", content=b"{}", headers={"authorization": f"Bearer ep_guess{i}"})).status_code
                     for i in range(40)]
            assert codes == [401, 401] + [429] * 38, codes  # the address's burst of 3, its first spent on the valid token
            assert int((await http.post("/v2/models/m/infer", content=b"{}")).headers["retry-after"]) >= 1
            # a token in use keeps its own bucket: the flood from its address does not limit it
            assert (await http.post("/v2/models/m/infer", content=b"{}", headers=ok)).status_code == 404
        assert looked_up == [secret, "ep_guess0", "ep_guess1"]
    finally:
        await fleet.stop()


#: What a PostgreSQL store that does not answer says: where the database is, which is for the
#: control plane's log and its admins, not for whoever calls its API or its gateway.
DOWN = "cannot reach the PostgreSQL store at postgresql://edgeplane:***@db-7.internal.example/fleet: connection refused"


async def test_gateway_answers_503_with_retry_after_while_the_token_store_does_not_answer(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A StoreError escaped the gateway's token check: every model request was a 500. The
    503 says to retry and no more: the caller is not authenticated."""
    fleet = await _control_plane(tmp_path, gateway_auth="token")
    try:
        cp = fleet.cp
        assert cp is not None

        def unreachable(secret: str, purpose: str) -> None:
            raise store_mod.StoreUnavailable(DOWN)

        monkeypatch.setattr(cp.store, "verify_token", unreachable)
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": "Bearer ep_x"}) as http:
            for method, path in (("POST", "/v2/models/m/infer"), ("GET", "/v2/models/m"), ("GET", "/openai/v1/models")):
                resp = await http.request(method, path, content=b"{}" if method == "POST" else None)
                assert resp.status_code == 503, (path, resp.text)
                assert int(resp.headers["retry-after"]) >= 1, path
                assert "retry" in resp.text and "db-7" not in resp.text and "PostgreSQL" not in resp.text, (path, resp.text)
            assert (await http.get("/v2/health/live")).status_code == 200
        assert DOWN in caplog.text  # the operator's log says what the callers are not told
    finally:
        await fleet.stop()


async def test_the_control_api_tells_a_token_store_down_for_now_from_one_refusing_the_lookup(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """As the API answers the store's errors: one the store may take later is 503 with
    Retry-After, which the CLI waits out; one refused for what it is is a 500, not retried.
    Neither says what the store said (where the database is, its schema) to a caller whose
    token could not be checked: the log does."""
    fleet = await _control_plane(tmp_path, auth="token")
    try:
        cp = fleet.cp
        assert cp is not None
        errors = {503: store_mod.StoreUnavailable(DOWN), 500: store_mod.StoreError("relation \"tokens\" does not exist")}
        for code, error in errors.items():
            def lookup(secret: str, purpose: str, error: Exception = error) -> None:
                raise error

            monkeypatch.setattr(cp.store, "verify_token", lookup)
            async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer ep_{code}"}) as http:
                for path in ("/v1/sites", "/v1/whoami"):
                    answer = await http.get(path)
                    assert answer.status_code == code or (path, code) == ("/v1/whoami", 500), (path, answer.text)
                    assert str(error) not in answer.text and "db-7" not in answer.text, (path, answer.text)
                    assert ("retry-after" in answer.headers) == (answer.status_code == 503), (path, answer.headers)
            assert str(error) in caplog.text
    finally:
        await fleet.stop()


async def test_a_store_down_for_now_is_named_to_admins_only(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read token (a dashboard's) is told to retry; an admin, who runs the control plane, is
    told what the store said."""
    fleet = await _control_plane(tmp_path, auth="token")
    try:
        cp = fleet.cp
        assert cp is not None
        read, _ = cp.store.create_token("api", "read", None, "test", "dashboards")
        admin, _ = cp.store.create_token("api", "admin", None, "test", "operator")
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            for secret in (read, admin):  # both checked while the store answers (kept a few seconds)
                assert (await http.get("/v1/sites", headers={"authorization": f"Bearer {secret}"})).status_code == 200

            def unreachable(*args: object) -> None:
                raise store_mod.StoreUnavailable(DOWN)

            monkeypatch.setattr(cp.store, "list", unreachable)
            said = {}
            for role, secret in (("read", read), ("admin", admin)):
                answer = await http.get("/v1/sites", headers={"authorization": f"Bearer {secret}"})
                assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1, answer.text
                said[role] = answer.json()["error"]
        assert "db-7" not in said["read"] and "retry" in said["read"]
        assert said["admin"] == DOWN
    finally:
        await fleet.stop()


async def test_gateway_body_limit(tmp_path: pathlib.Path) -> None:
    fleet = await _control_plane(tmp_path, gateway_max_body=1024)
    try:
        assert fleet.cp is not None
        async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
            assert (await http.post("/v2/models/m/infer", content=b"x" * 2048)).status_code == 413

            async def chunks():  # no content-length: the stream is counted
                for _ in range(4):
                    yield b"x" * 512

            assert (await http.post("/v2/models/m/infer", content=chunks())).status_code == 413
            assert (await http.post("/v2/models/m/infer", content=b"x" * 512)).status_code == 404
    finally:
        await fleet.stop()


async def test_api_limits_body_and_objects_per_apply(tmp_path: pathlib.Path) -> None:
    fleet = await _control_plane(tmp_path)
    try:
        assert fleet.cp is not None
        async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
            assert (await http.post("/v1/apply", content=b"#" * (5 * 1024 * 1024))).status_code == 413
            site = "apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {{name: s{i}}}\nspec: {{tier: edge, location: {{country: FR, lat: 1, lon: 1}}}}\n"
            many = "---\n".join(site.format(i=i) for i in range(1001))
            resp = await http.post("/v1/apply", content=many.encode())
            assert resp.status_code == 422 and "more than 1000" in resp.text
            assert (await http.get("/v1/sites")).json()["items"] == []  # nothing applied
            resp = await http.post("/v1/tokens", content=b"{" * (70 * 1024))
            assert resp.status_code == 413
    finally:
        await fleet.stop()


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(gateway_auth="open"), "--gateway-auth"), (dict(gateway_rate=-1.0), "--gateway-rate"),
    (dict(gateway_max_body=0), "--gateway-max-body"),
    (dict(gateway_rate=1e-9), "--gateway-rate 1e-09 is too slow"), (dict(leader_lease_s=0.5), "--leader-lease"),
    (dict(store_poll_s=0.0), "--store-poll"), (dict(store_threads=0), "--store-threads must be from 1 to 256"),
    # a bucket smaller than one request refuses every request forever, whatever the rate
    (dict(gateway_rate=10.0, gateway_burst=0.5), "--gateway-burst 0.5 is less than one request"),
    (dict(first_token_timeout_s=0.0), "--first-token-timeout must be from 1 to 3600 seconds"),
    (dict(join_failure_rate=-1.0), "--join-failure-rate"), (dict(join_failure_burst=0.5), "--join-failure-burst 0.5"),
])
async def test_bad_gateway_settings_refuse_to_start(tmp_path: pathlib.Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(server_config.ConfigError, match=message):
        await server.ControlPlane(server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, **overrides)).start()  # type: ignore[arg-type]


def test_the_first_token_timeout_reaches_both_gateways_openai_routes(tmp_path: pathlib.Path) -> None:
    """A long prompt on slow hardware may need more than the 60 s default before its first token."""
    parser = cli_main.build_parser()
    served = server_config.config_from_args(parser.parse_args(["serve", "--first-token-timeout", "300"]))
    alone = gatewayd.config_from_args(parser.parse_args(["gateway", "--control-plane", "http://127.0.0.1:9", "--first-token-timeout",
                                                         "300"]), None)
    assert served.first_token_timeout_s == alone.first_token_timeout_s == 300.0
    assert server_config.ServerConfig().first_token_timeout_s == 60.0


async def test_the_control_planes_openai_routes_wait_the_first_token_timeout_given(tmp_path: pathlib.Path) -> None:
    fleet = await _control_plane(tmp_path, first_token_timeout_s=300.0)
    try:
        assert fleet.cp is not None and fleet.cp.openai_gateway.first_token_timeout == 300.0
    finally:
        await fleet.stop()


async def test_public_address_without_auth_refuses_with_how_to(tmp_path: pathlib.Path) -> None:
    with pytest.raises(server_config.ConfigError, match="--auth token"):
        await server.ControlPlane(server_config.ServerConfig(data_dir=tmp_path, host="0.0.0.0", port=0, agent_port=0)).start()


async def test_the_store_threads_given_are_the_ones_the_store_runs_its_calls_on(tmp_path: pathlib.Path) -> None:
    parser = cli_main.build_parser()
    assert server_config.config_from_args(parser.parse_args(["serve", "--store-threads", "2"])).store_threads == 2
    fleet = await _control_plane(tmp_path, store_threads=2)
    try:
        assert fleet.cp is not None and fleet.cp.store.threads.threads == 2
    finally:
        await fleet.stop()


async def test_joins_refused_for_their_addresss_failures_are_counted_in_metrics(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made-up bootstrap tokens sent to the join port were each looked up in the store, as
    many as were sent; past --join-failure-burst they are refused unread and counted."""
    parser = cli_main.build_parser()
    given = server_config.config_from_args(parser.parse_args(["serve", "--join-failure-rate", "0.01", "--join-failure-burst", "2"]))
    assert (given.join_failure_rate, given.join_failure_burst) == (0.01, 2.0)
    fleet = await _control_plane(tmp_path, join_failure_rate=given.join_failure_rate, join_failure_burst=given.join_failure_burst)
    try:
        cp = fleet.cp
        assert cp is not None and cp.ca_file is not None and cp.agent_join_target is not None
        looked_up = token_lookups.counted(monkeypatch, cp.store)
        codes = []
        async with grpc.aio.secure_channel(cp.agent_join_target, grpc.ssl_channel_credentials(cp.ca_file.read_bytes())) as channel:
            for i in range(5):
                try:
                    await pb_grpc.AgentControlStub(channel).Join(
                        pb.JoinRequest(site="edge-x", bootstrap_token=f"ep_guess{i}", endpoint_url="http://127.0.0.1:9"), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, codes
        assert looked_up == ["ep_guess0", "ep_guess1"]
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            metrics = (await http.get("/metrics")).text
        assert "edgeplane_agent_joins_refused_for_failures_total 3.0" in metrics
        assert "edgeplane_agent_joins_refused_total 0.0" in metrics
    finally:
        await fleet.stop()
