"""A replica that answers 503 is not down: its model is not ready yet, or the agent is
draining (a rolling restart), and it says when to retry. When every replica tried answers so,
the gateway answers 503 with Retry-After, on the v2 and the OpenAI routes alike, not 502
"every replica tried failed", which reads as a fault; a replica that failed among them keeps
it a 502. Real HTTP; the replicas answer as a draining agent does (``edge_agent/http.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge_agent import httplistener, httpmessages, refusals
from edgeplane_proto import retry_after as retry_header
from edgeplane_proto.headers import DRAINING
from orchestrator.gateway import cascade, cascade_rules, endpoints, failover, openai_routes, proxy
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.testing import loopback

from . import replica_gateway

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
INFER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


async def draining(request: Request) -> Response:
    if request.url.path.startswith("/v1/"):
        return Response(refusals.openai_error_body("the agent is draining", "server_error", None, "draining"), status_code=503,
                        media_type="application/json", headers={"retry-after": "1"})
    return Response(json.dumps({"error": "model 'm' is not ready (LOADING: downloading)"}), status_code=503,
                    media_type="application/json")


async def failing(request: Request) -> Response:
    return Response(b'{"error": "boom"}', status_code=500, media_type="application/json")


def replica(answer) -> Starlette:  # noqa: ANN001
    return Starlette(routes=[Route("/{path:path}", answer, methods=["POST"])])


@contextlib.asynccontextmanager
async def gateway_over(*answers, table: endpoints.EndpointTable | None = None) -> AsyncIterator[httpx.AsyncClient]:  # noqa: ANN002
    async with contextlib.AsyncExitStack() as stack:
        ports = [await stack.enter_async_context(loopback.serving(replica(a))) for a in answers]
        yield await stack.enter_async_context(replica_gateway.gateway_at(ports, table))




async def test_a_model_whose_only_replica_drains_is_503_with_retry_after_on_both_apis() -> None:
    async with gateway_over(draining) as http:
        chat = await http.post("/openai/v1/chat/completions", json=CHAT)
        assert chat.status_code == 503, chat.text
        assert chat.headers["retry-after"] == "1"
        assert chat.json()["error"]["code"] == "unavailable"
        infer = await http.post("/v2/models/m/infer", json=INFER)
        assert infer.status_code == 503, infer.text
        assert infer.headers["retry-after"] == "1"
        assert "not ready" in infer.json()["error"]


async def test_a_model_whose_every_agent_is_stopping_is_503_with_retry_after_not_502() -> None:
    """A rolling restart: both agents got SIGTERM and drain, a request still running on each.
    The agents' own HTTP server answers the gateway's new connections (their idle ones were
    closed by the drain) that they are stopping, and the gateway says when to retry."""
    release = asyncio.Event()
    running = 0

    async def busy(request: httpmessages.Request) -> httpmessages.Response:
        nonlocal running
        running += 1
        await release.wait()
        return httpmessages.Response(200, b"{}")

    servers, socks = [httplistener.HttpServer(busy) for _ in range(2)], [socket.socket() for _ in range(2)]
    for server, sock in zip(servers, socks, strict=True):
        sock.bind(("127.0.0.1", 0))
        await server.start(sock)
    ports = [sock.getsockname()[1] for sock in socks]
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(replica_gateway.gateway_at(ports))
        direct = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
        in_flight = [asyncio.create_task(direct.post(f"http://127.0.0.1:{p}/v2/models/m/infer", json=INFER)) for p in ports]
        while running < 2:
            await asyncio.sleep(0.01)
        stopping = [asyncio.create_task(server.shutdown(30)) for server in servers]
        await asyncio.sleep(0)  # both drains have started
        try:
            for path, body in (("/openai/v1/chat/completions", CHAT), ("/v2/models/m/infer", INFER)):
                answer = await http.post(path, json=body)
                assert (answer.status_code, answer.headers.get("retry-after")) == (503, "1"), (path, answer.text)
        finally:
            release.set()
            await asyncio.gather(*in_flight, *stopping)


async def moved(request: Request) -> Response:
    """An agent the model was moved away from a moment ago (the table still lists it)."""
    if request.url.path.startswith("/v1/"):
        return Response(refusals.openai_error_body("model 'llm' is not served here", "invalid_request_error", "model", "model_not_found"),
                        status_code=404, media_type="application/json")
    return Response(b'{"error": "model \'m\' is not served here"}', status_code=404, media_type="application/json")


async def loading(request: Request) -> Response:
    return Response(b'{"error": "model is not ready (LOADING: downloading)"}', status_code=503, media_type="application/json",
                    headers={"retry-after": "2"})


@pytest.mark.parametrize(("path", "body"), [("/openai/v1/chat/completions", CHAT), ("/v2/models/m/infer", INFER)], ids=["openai", "v2"])
async def test_a_model_moved_from_one_replica_and_loading_at_the_next_is_503_with_retry_after_not_502(path: str, body: dict) -> None:
    """A model moved (or its deployment rolled): the old site answers 404, the new one 503
    while it loads. Neither failed, and a retry in 2 s can succeed."""
    async with gateway_over(moved, loading) as http:
        answer = await http.post(path, json=body)
    assert (answer.status_code, answer.headers.get("retry-after")) == (503, "2"), answer.text
    assert "HTTP 404" in answer.text and "HTTP 503" in answer.text, answer.text


@pytest.mark.parametrize(("unavailable", "failed", "retry"), [
    pytest.param([2], 1, 2, id="one 503"),
    pytest.param([5, 2], 2, 2, id="the shortest of two 503s"),
    pytest.param([None, 2], 2, 2, id="a 404 and a 503"),
    pytest.param([2, None, None], 3, 2, id="a 503 and two 404s"),
    pytest.param([None], 1, None, id="only a 404: no replica said when"),
    pytest.param([None, 2], 3, None, id="a 404, a 503 and a failure"),
    pytest.param([2], 2, None, id="a 503 and a failure"),
    pytest.param([], 0, None, id="nothing tried"),
])
def test_when_a_caller_may_retry_after_the_replicas_tried(unavailable: list[int | None], failed: int, retry: int | None) -> None:
    assert failover.retry_after(unavailable, failed) == retry


async def test_a_replica_that_failed_among_unavailable_ones_keeps_it_a_502() -> None:
    async with gateway_over(draining, failing) as http:
        chat = await http.post("/openai/v1/chat/completions", json=CHAT)
        assert chat.status_code == 502, chat.text
        infer = await http.post("/v2/models/m/infer", json=INFER)
        assert infer.status_code == 502, infer.text


NOW = datetime.datetime(2026, 10, 21, 7, 28, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize(("header", "seconds"), [
    (None, None), ("0", 0.0), ("7", 7.0), (" 5 ", 5.0), ("86400", 86400.0),
    ("Wed, 21 Oct 2026 07:28:30 GMT", 30.0),  # IMF-fixdate, the form RFC 9110 sends
    ("Wednesday, 21-Oct-26 07:28:30 GMT", 30.0),  # RFC 850's, which a recipient must still read
    ("Wed Oct 21 07:28:30 2026", 30.0),  # asctime's, in UTC with no zone named
    ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),  # past: no wait
    ("Wed, 21 Oct 2026 07:28:30 -0000", None),  # a zone unknown: no HTTP date
    ("Wed, 21 Oct 2026 07:28:30", None), ("soon", None), ("-3", None), ("\xb2", None), ("\u0663", None), ("9" * 5000, None),
])
def test_a_retry_after_is_read_in_seconds_or_as_an_http_date(header: str | None, seconds: float | None) -> None:
    """The reader the client, the CLI and the gateway share: both forms RFC 9110 gives,
    and the three forms of its date."""
    assert retry_header.seconds(header, NOW) == seconds


@pytest.mark.parametrize(("header", "seconds"), [(None, 1), ("0", 1), ("7", 7), ("86400", 60), ("Wed, 21 Oct 2026 07:28:30 GMT", 30),
                                                 ("Wed, 21 Oct 2026 07:28:00 GMT", 1), ("Wed Oct 21 07:28:10 2026", 10),
                                                 ("Wed, 21 Oct 2015 07:28:00 GMT", 1), ("Fri, 01 Jan 2100 00:00:00 GMT", 60),
                                                 ("-3", 1), (" 5 ", 5), ("\xb2", 1), ("\u0663", 1), ("9" * 5000, 1)])
def test_a_replicas_retry_after_is_passed_on_within_bounds(header: str | None, seconds: int) -> None:
    """In whole seconds from 1 to 60, either form: a date past (a replica's clock behind the
    gateway's), or one that cannot be read, is the least."""
    assert failover.retry_after_s(header, NOW) == seconds


@pytest.mark.parametrize("header", ["\xb2", "9" * 5000], ids=["superscript-two", "5000-digits"])
async def test_a_replica_s_unreadable_retry_after_is_read_as_one_second(header: str) -> None:
    async def unavailable(request: Request) -> Response:
        body = (refusals.openai_error_body("the agent is draining", "server_error", None, "draining")
                if request.url.path.startswith("/v1/") else b'{"error": "draining"}')
        return Response(body, status_code=503, media_type="application/json", headers={"retry-after": header})

    async with gateway_over(unavailable) as http:
        for path, body in (("/openai/v1/chat/completions", CHAT), ("/v2/models/m/infer", INFER)):
            answer = await http.post(path, json=body)
            assert (answer.status_code, answer.headers.get("retry-after")) == (503, "1"), (path, answer.text)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("said", "passed_on"), [("7", "7"), ("999999999", "60"), ("Fri, 01 Jan 2100 00:00:00 GMT", "60"),
                                                 ("Wed, 21 Oct 2015 07:28:00 GMT", "1")],
                         ids=["seconds", "31-years", "a-date-far-off", "a-date-past"])
async def test_a_replica_at_capacity_s_retry_after_is_passed_on_within_bounds(stream: bool, said: str, passed_on: str) -> None:
    """A 429's Retry-After reaches the caller as a 503's does, 1 to 60 s: a client that
    honours it (urllib3's Retry, with no cap) would otherwise wait as long as a wrong clock says."""
    async def full(request: Request) -> Response:
        return Response(refusals.openai_error_body("at capacity", "rate_limit_error", None, "rate_limit_exceeded"), status_code=429,
                        media_type="application/json", headers={"retry-after": said})

    async with gateway_over(full) as http:
        answer = await http.post("/openai/v1/chat/completions", json={**CHAT, "stream": stream})
    assert (answer.status_code, answer.headers.get("retry-after")) == (429, passed_on), answer.text


@pytest.mark.parametrize(("said", "ejected_s"), [("2", 2), ("Wed, 21 Oct 2015 07:28:00 GMT", 1)], ids=["seconds", "a-date-past"])
async def test_a_replica_s_503_ejects_it_no_longer_than_its_retry_after_says(said: str, ejected_s: int) -> None:
    """An agent whose model was replaced while a request waited answers 503 with
    ``Retry-After: 1``: it serves the new version at once, and must not be passed over for
    the whole ejection. A date says how long as well (one past: the least, 1 s)."""
    async def replaced(request: Request) -> Response:
        body = (refusals.openai_error_body("model 'llm' was unloaded or replaced while this request waited; retry", "server_error",
                                           "model", "model_not_ready")
                if request.url.path.startswith("/v1/") else b'{"error": "replaced"}')
        return Response(body, status_code=503, media_type="application/json", headers={"retry-after": said})

    now = [100.0]
    table = endpoints.EndpointTable(clock=lambda: now[0], ejection_s=15)
    async with gateway_over(replaced, table=table) as http:
        for path, body in (("/openai/v1/chat/completions", CHAT), ("/v2/models/m/infer", INFER)):
            answer = await http.post(path, json=body)
            assert (answer.status_code, answer.headers.get("retry-after")) == (503, str(ejected_s)), (path, answer.text)
            assert len(table.ejected()) == 1, path
            now[0] += ejected_s + 0.1
            assert table.ejected() == frozenset(), path


@pytest.mark.parametrize("said", [{"retry-after": "1", DRAINING: "1"}, {"retry-after": "soon"}, {}],
                         ids=["draining", "unreadable", "none"])
async def test_a_503_ejects_a_replica_for_the_whole_ejection_unless_it_says_how_long(said: dict[str, str]) -> None:
    """Only a Retry-After (in seconds or as a date) from a replica that is not going away
    shortens its ejection: an agent that says it is draining (its 503s carry Retry-After: 1
    for direct callers) would otherwise be asked again each second until it stops."""
    async def unavailable(request: Request) -> Response:
        return Response(b'{"error": "unavailable"}', status_code=503, media_type="application/json", headers=said)

    now = [100.0]
    table = endpoints.EndpointTable(clock=lambda: now[0], ejection_s=15)
    async with gateway_over(unavailable, table=table) as http:
        for path, body in (("/openai/v1/chat/completions", CHAT), ("/v2/models/m/infer", INFER)):
            assert (await http.post(path, json=body)).status_code == 503, path
            now[0] += 14.9
            assert len(table.ejected()) == 1, path
            now[0] += 0.2
            assert table.ejected() == frozenset(), path


async def test_a_model_whose_replicas_are_starting_is_503_with_retry_after_on_every_route() -> None:
    """Placed, not answering yet (its deployment is Progressing): a retry soon can succeed, on
    the v2 and OpenAI routes and through a cascade on either alike; a model with nothing on
    its way (no site for it) is 503 without one."""
    table = endpoints.EndpointTable()
    progressing = "deployment {} is Progressing: 1 replica(s): replicas.min = 1"
    table.replace([], deployed={m: progressing.format(m) for m in ("m", "llm", "c")} | {"nowhere": "deployment nowhere is Unschedulable"},
                  starting={"m", "llm", "c"})
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8))
    table.set_cascades({"c": cascade_rules.CascadeRoute("c", "c", (first, cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})})
    registry = CollectorRegistry()
    pool = UpstreamPool()
    gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry),
                            cascade=cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry)))
    app = Starlette(routes=gateway.routes() + openai_routes.OpenAIGateway(gateway, registry=registry).routes())
    async with loopback.serving(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        answers = [await http.post("/v2/models/m/infer", json=INFER), await http.post("/openai/v1/chat/completions", json=CHAT),
                   await http.post("/v2/models/c/infer", json=INFER), await http.post("/openai/v1/chat/completions", json=CHAT | {"model": "c"})]
        nowhere = await http.post("/v2/models/nowhere/infer", json=INFER)
    for r in answers:
        assert (r.status_code, r.headers.get("retry-after")) == (503, "2"), r.text
    assert nowhere.status_code == 503 and "retry-after" not in nowhere.headers, nowhere.text
