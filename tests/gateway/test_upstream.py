"""The gateway's upstream pool against real loopback servers, well- and ill-behaved."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httplistener, httpmessages
from orchestrator.gateway import endpoints, proxy, routing
from orchestrator.gateway.upstream import UpstreamError, UpstreamPool, UpstreamTimeout
from tests.ipv6 import needs_ipv6_loopback


def idle_connections(pool: UpstreamPool) -> dict[tuple[str, str, int], list[Any]]:
    """The connections ``pool`` keeps idle, by origin (scheme, host, port). Read from its
    private record: the pool shows no connection, and these tests look at the socket of one
    and at which origins it still holds."""
    return {origin: list(idle) for origin, idle in pool._idle.items()}


async def echo_server() -> tuple[httplistener.HttpServer, int]:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(200, request.body, headers=(("x-path", request.path),))

    server = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    return server, sock.getsockname()[1]


async def raw_server(answer: bytes, *, close: bool = True, delay: float = 0.0) -> tuple[asyncio.Server, int, list[int]]:
    """Reads one request head, writes ``answer`` verbatim; counts connections."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(delay)
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def test_connections_are_reused_and_answers_are_complete() -> None:
    server, port = await echo_server()
    pool = UpstreamPool()
    try:
        for i in range(5):
            answer = await pool.request("POST", f"http://127.0.0.1:{port}/v2/x?i={i}", b"body-%d" % i, {"content-type": "text/plain"})
            assert answer.status == 200 and answer.body == b"body-%d" % i and answer.headers["x-path"] == "/v2/x"
        assert len(server.connections) == 1
        get = await pool.request("GET", f"http://127.0.0.1:{port}/v2/y")
        assert get.status == 200 and get.body == b""
    finally:
        await pool.close()
        await server.shutdown(1)


async def test_an_idle_connection_closed_by_the_server_is_replaced_transparently() -> None:
    server, port = await echo_server()
    pool = UpstreamPool()
    try:
        assert (await pool.request("POST", f"http://127.0.0.1:{port}/a", b"1")).body == b"1"
        for conn in list(server.connections):  # the server drops its idle keep-alive socket
            conn.close()
        assert (await pool.request("POST", f"http://127.0.0.1:{port}/a", b"2")).body == b"2"
    finally:
        await pool.close()
        await server.shutdown(1)


async def test_connections_probe_their_replica_so_a_host_gone_without_a_word_is_dropped() -> None:
    """A host that lost power sends no RST: only keep-alive probes find that a connection to it
    is dead, whether idle in the pool or waiting for an answer with no time limit."""
    server, port = await echo_server()
    pool = UpstreamPool(keepalive=(7, 2, 4))
    try:
        await pool.request("GET", f"http://127.0.0.1:{port}/")
        [[conn]] = idle_connections(pool).values()
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert [sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, o)) for o in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")] == [7, 2, 4]
    finally:
        await pool.close()
        await server.shutdown(1)


async def test_connections_idle_past_their_time_are_closed_and_replicas_gone_leave_nothing() -> None:
    """Replicas come and go at addresses of their own, and a host that vanished never closes
    its end: a connection idle for ``idle_s`` is closed, and its origin forgotten."""
    now = [0.0]
    (gone, gone_port), (kept, kept_port), (new, new_port) = [await echo_server() for _ in range(3)]
    pool = UpstreamPool(idle_s=30.0, clock=lambda: now[0])
    try:
        for port in (gone_port, kept_port):
            await pool.request("GET", f"http://127.0.0.1:{port}/")
        now[0] = 10.0
        await pool.request("GET", f"http://127.0.0.1:{kept_port}/")
        now[0] = 35.0  # gone's connection has been idle 35 s, kept's 25 s
        await pool.request("GET", f"http://127.0.0.1:{new_port}/")
        for _ in range(200):
            if not gone.connections:
                break
            await asyncio.sleep(0.01)
        assert not gone.connections and len(kept.connections) == 1 and len(new.connections) == 1
        assert sorted(port for _, _, port in idle_connections(pool)) == sorted((kept_port, new_port))
    finally:
        await pool.close()
        for server in (gone, kept, new):
            await server.shutdown(1)


async def test_a_connection_idle_past_its_time_is_not_reused_even_before_a_sweep() -> None:
    """The replica's keep-alive ends after 75 s, and a connection it closed meanwhile may not
    yet read as closed here: one idle for ``idle_s`` is never sent a request, whenever the
    pool last swept (here, a moment before the connection went idle)."""
    now = [0.0]
    server, port, accepted = await raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", close=False)
    pool = UpstreamPool(idle_s=60.0, clock=lambda: now[0])
    try:
        url = f"http://127.0.0.1:{port}/"
        await pool.request("GET", url)  # swept now: the next sweep is due at 60 s
        now[0] = 59.0
        await pool.request("GET", url)  # reused, idle since 59 s
        assert len(accepted) == 1
        now[0] = 119.0  # idle 60 s: the pool's time is up, though no sweep has run since it went back
        assert (await pool.request("GET", url)).body == b"ok"
        assert len(accepted) == 2
        now[0] = 150.0
        await pool.request("GET", url)  # idle 31 s: reused
        assert len(accepted) == 2
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_chunked_and_close_delimited_answers() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    server, port, _ = await raw_server(chunked, close=False)
    until_close, port2, _ = await raw_server(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    pool = UpstreamPool()
    try:
        assert (await pool.request("GET", f"http://127.0.0.1:{port}/")).body == b"abcde"
        assert (await pool.request("GET", f"http://127.0.0.1:{port2}/")).body == b"all of it"
    finally:
        await pool.close()
        server.close()
        until_close.close()


async def test_trailer_fields_of_a_chunked_answer_are_not_taken_for_headers() -> None:
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"2\r\n{}\r\n0\r\nContent-Type: text/html\r\nX-Trailer: t\r\n\r\n")
    server, port, _ = await raw_server(answer, close=False)
    pool = UpstreamPool()
    try:
        whole = await pool.request("GET", f"http://127.0.0.1:{port}/")
        async with await pool.stream("GET", f"http://127.0.0.1:{port}/") as streamed:
            assert await streamed.body() == b"{}"
        for headers in (whole.headers, streamed.headers):
            assert headers["content-type"] == "application/json" and "x-trailer" not in headers
    finally:
        await pool.close()
        server.close()


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "connection closed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, "larger than 1000 bytes"),
        (b"", "connection closed"),
    ],
)
async def test_broken_answers_are_upstream_errors(answer: bytes, fragment: str) -> None:
    server, port, accepted = await raw_server(answer)
    pool = UpstreamPool(max_body=1000)
    try:
        with pytest.raises(UpstreamError, match=fragment):
            await pool.request("POST", f"http://127.0.0.1:{port}/", b"x")
        assert len(accepted) == 1  # a fresh connection is never retried
    finally:
        await pool.close()
        server.close()


async def test_refused_and_slow_upstreams() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        pool = UpstreamPool()
        with pytest.raises(UpstreamError, match="failed") as refused:
            await pool.request("GET", f"http://127.0.0.1:{port}/")
        assert not isinstance(refused.value, UpstreamTimeout)  # nothing was sent: the replica is down
    slow, slow_port, _ = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", delay=5)
    pool = UpstreamPool(timeout=0.2)
    try:
        with pytest.raises(UpstreamTimeout, match="no answer within 0.2s"):  # taken, not answered: slow at this request
            await pool.request("GET", f"http://127.0.0.1:{slow_port}/")
        for unusable in ("ftp://127.0.0.1/x", "http://127.0.0.1:99999/x", "http://127.0.0.1:80a/x"):
            with pytest.raises(UpstreamError, match="cannot forward"):
                await pool.request("GET", unusable)
    finally:
        await pool.close()
        slow.close()


async def test_every_idle_connection_closed_by_the_server_still_gets_an_answer() -> None:
    server, port = await echo_server()
    pool = UpstreamPool()
    try:
        url = f"http://127.0.0.1:{port}/a"
        await asyncio.gather(*(pool.request("POST", url, b"%d" % i) for i in range(3)))  # three idle sockets
        assert len(server.connections) == 3
        for conn in list(server.connections):
            conn.close()
        assert (await pool.request("POST", url, b"after")).body == b"after"
    finally:
        await pool.close()
        await server.shutdown(1)


async def test_interim_answers_are_skipped() -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal"
    server, port, _ = await raw_server(hints, close=False)
    pool = UpstreamPool()
    try:
        answer = await pool.request("GET", f"http://127.0.0.1:{port}/")
        assert (answer.status, answer.body, answer.headers.get("x-final"), "link" in answer.headers) == (200, b"final", "yes", False)
    finally:
        await pool.close()
        server.close()


ANSWER = httpmessages.Response(200, b'{"model_name":"m","outputs":[]}', headers=(("content-type", "application/json"),))


async def gateway_over(handle: httpmessages.Handler, *, timeout: float = 30.0, replicas: int = 2, registry: CollectorRegistry | None = None
                       ) -> tuple[list[httplistener.HttpServer], endpoints.EndpointTable, UpstreamPool, Starlette]:
    """The gateway's v2 routes over ``replicas`` real loopback servers that answer with ``handle``."""
    servers, table = [], endpoints.EndpointTable()
    for i in range(replicas):
        server = httplistener.HttpServer(handle)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await server.start(sock)
        servers.append(server)
        table.replace([*table.all_endpoints(), routing.Endpoint("m", "dep", f"edge-{i}", "edge", "FR", "", 48.8, 2.3,
                                                                f"http://127.0.0.1:{sock.getsockname()[1]}")])
    pool = UpstreamPool(timeout=timeout)
    metrics = proxy.GatewayMetrics.create(registry or CollectorRegistry())
    return servers, table, pool, Starlette(routes=proxy.Gateway(table, pool, metrics).routes())


async def test_one_slow_request_leaves_every_replica_to_the_other_callers() -> None:
    """A request slower than the upstream timeout (a huge batch) fails on each replica it is
    tried on, and takes none of them from the next caller."""
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        if b"huge" in request.body:
            await asyncio.sleep(5)
        return ANSWER

    registry = CollectorRegistry()
    servers, table, pool, app = await gateway_over(handle, timeout=0.3, registry=registry)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            slow = await http.post("/v2/models/m/infer", content=b'{"inputs": "huge"}')
            other = await http.post("/v2/models/m/infer", content=b'{"inputs": []}')
    finally:
        await pool.close()
        for server in servers:
            await server.shutdown(1)
    assert slow.status_code == 502 and slow.json()["error"].count("no answer within 0.3s") == 2, slow.text
    assert other.status_code == 200, other.text
    assert table.ejected() == frozenset()
    # one move to the next replica: the last failed attempt moved nowhere
    assert registry.get_sample_value("edgeplane_gateway_failovers_total", {"model": "m", "site": "edge-0"}) == 1
    assert registry.get_sample_value("edgeplane_gateway_failovers_total", {"model": "m", "site": "edge-1"}) is None


async def test_with_every_replica_ejected_the_next_caller_is_still_tried_on_them() -> None:
    """Each replica turned one request away (503: its connections were full for a moment)
    and was ejected; the next caller is sent to them all the same, not answered 503."""
    turned_away: set[str] = set()

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        port = request.headers.get("host", "").rpartition(":")[2]
        if port not in turned_away:
            turned_away.add(port)
            return httpmessages.Response(503, b'{"error": "too many connections; try again"}', headers=(("content-type", "application/json"),))
        return ANSWER

    servers, table, pool, app = await gateway_over(handle)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            first = await http.post("/v2/models/m/infer", content=b'{"inputs": []}')
            # every replica said "not now": so does the gateway, with when to come back
            assert first.status_code == 503 and "retry-after" in first.headers and len(table.ejected()) == 2, first.text
            second = await http.post("/v2/models/m/infer", content=b'{"inputs": []}')
    finally:
        await pool.close()
        for server in servers:
            await server.shutdown(1)
    assert second.status_code == 200, second.text


@needs_ipv6_loopback
async def test_a_replica_on_ipv6_that_cannot_be_reached_is_named_in_brackets() -> None:
    """A replica at ``http://[::1]:<port>`` that refused the connection was reported as
    'connect to ::1:<port> failed', an address no URL or flag takes (where does the host
    end?); it reads 'connect to [::1]:<port> failed', as the replica's URL writes it."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("m", "dep", "edge-0", "edge", "FR", "", 48.8, 2.3, f"http://[::1]:{port}")])
        pool = UpstreamPool()
        app = Starlette(routes=proxy.Gateway(table, pool, proxy.GatewayMetrics.create(CollectorRegistry())).routes())
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
                answer = await http.post("/v2/models/m/infer", content=b'{"inputs": []}')
        finally:
            await pool.close()
    assert answer.status_code == 502, answer.text
    assert f"connect to [::1]:{port} failed" in answer.json()["error"], answer.text
