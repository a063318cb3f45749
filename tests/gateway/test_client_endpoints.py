"""What a Python client is made with and where it sends: it needs a URL, a proxy in the
environment it cannot use is a ValueError naming it, NO_PROXY is read as curl reads it
(address blocks included), a model name is one path segment of
every URL, a versioned request goes to the replicas that hold that version, clients of
two residencies sharing a cache each get their own endpoint list, an array in either byte
order is sent as its datatype, and an async client serves one event loop after another
until it is closed."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import ssl

import httpx
import numpy as np
import pytest

from edge_agent import httplistener, httpmessages
from edgeplane_proto import oip
from orchestrator import client as client_mod
from orchestrator import proxyenv
from orchestrator.testing import loopback

from .loopback import answering, v2_server


@pytest.mark.parametrize("servers", [[], [""], "", [None]])
def test_a_client_needs_a_url(servers: object) -> None:
    with pytest.raises(ValueError, match="gateway"):
        client_mod.Client(servers)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [client_mod.Client, client_mod.AsyncClient])
@pytest.mark.parametrize(("setting", "said"), [
    ("socks5://ops:s3cret@127.0.0.1:1080", "a SOCKS proxy needs the socksio package (pip install socksio)"),
    ("socks4://127.0.0.1:1080", "Unknown scheme for proxy URL"),
    ("http://ops:s3cret@127.0.0.1:abc", "not a URL (Invalid port: 'abc')"),
    ("http://[::1", "not a URL (Invalid port"),
])
def test_a_proxy_in_the_environment_that_cannot_be_used_is_a_value_error_naming_it(
        make: type[client_mod.Client] | type[client_mod.AsyncClient], setting: str, said: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``ssh -D`` tunnel in ALL_PROXY: httpx mounts the proxies of the environment as the
    client is made, and what it cannot use is a setting that cannot work, said before
    anything is sent (and its password is not)."""
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ALL_PROXY", setting)
    with pytest.raises(ValueError) as raised:
        make("http://127.0.0.1:8088")
    message = str(raised.value)
    assert message.startswith(f"ALL_PROXY='{setting.replace('ops:s3cret', '***')}': {said}"), message
    assert "s3cret" not in message, message


@pytest.mark.parametrize(("no_proxy", "url", "direct"), [
    ("127.0.0.0/8", "http://127.0.0.1:8088/", True),
    ("10.0.0.0/8, 127.0.0.0/8", "http://127.0.0.1:8088/", True),
    ("10.0.0.0/8", "http://127.0.0.1:8088/", False),
    ("10.0.0.0/8", "http://10.20.30.40/", True),
    ("10.0.0.0/8", "http://edge.example/", False),  # names are not resolved to decide
    ("127.0.0.1", "http://127.0.0.1:8088/", True),
    ("127.0.0.1:9000", "http://127.0.0.1:8088/", False),
    ("127.0.0.1:9000", "http://127.0.0.1:9000/", True),
    ("fd00::/8", "http://[fd00::1]:8080/", True),
    ("[::1]", "http://[::1]:8080/", True),
    ("example.com", "http://example.com/", True),
    ("example.com", "http://api.EXAMPLE.com/", True),
    ("example.com", "http://badexample.com/", False),
    (".example.com", "http://example.com/", True),  # the leading dot is ignored, as curl and urllib ignore it
    (".example.com", "http://api.example.com/", True),
    (".example.com", "http://badexample.com/", False),
    ("*.example.com", "http://api.example.com/", True),
    ("localhost", "http://localhost:8080/", True),
    ("*", "http://anything.example/", True),
    ("", "http://127.0.0.1:8088/", False),
])
def test_no_proxy_exempts_hosts_domains_and_address_blocks(no_proxy: str, url: str, direct: bool) -> None:
    """As curl reads it: httpx took ``127.0.0.0/8`` for the one host 127.0.0.0."""
    settings = proxyenv.settings_of({"http": "http://proxy:3128", "no": no_proxy})
    assert proxyenv.proxy_for(settings, httpx.URL(url)) == (None if direct else "http://proxy:3128")


def test_a_proxy_is_chosen_by_scheme_then_all_proxy() -> None:
    settings = proxyenv.settings_of({"https": "tls-proxy:3128", "all": "http://any-proxy:3128"})
    assert proxyenv.proxy_for(settings, httpx.URL("https://gw.example/")) == "http://tls-proxy:3128"
    assert proxyenv.proxy_for(settings, httpx.URL("http://gw.example/")) == "http://any-proxy:3128"


@pytest.mark.parametrize("make", [client_mod.Client, client_mod.AsyncClient])
@pytest.mark.parametrize(("no_proxy", "direct"), [("127.0.0.0/8", True), ("10.0.0.0/8,127.0.0.0/8", True), ("10.0.0.0/8", False)])
async def test_a_client_calls_an_address_inside_a_no_proxy_block_directly(
        make: type[client_mod.Client] | type[client_mod.AsyncClient], no_proxy: str, direct: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    proxied: list[str] = []

    async def proxy(request: httpmessages.Request) -> httpmessages.Response:
        proxied.append(request.path)
        return httpmessages.Response(502, b'{"error": "the proxy cannot reach that network"}')

    proxy_server = httplistener.HttpServer(proxy)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await proxy_server.start(sock)
    gateway, url = await v2_server("gw-site")
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    x = {"input": np.array([1.0], np.float32)}

    def infer() -> client_mod.InferResult:
        with client_mod.Client(url, direct=False, timeout=5) as c:
            return c.infer("m", x)

    async def ainfer() -> client_mod.InferResult:
        async with client_mod.AsyncClient(url, direct=False, timeout=5) as c:
            return await c.infer("m", x)

    try:
        if direct:
            result = await (asyncio.to_thread(infer) if make is client_mod.Client else ainfer())
            assert result["output"].tolist() == [2.0] and proxied == []
        else:
            with pytest.raises(client_mod.InferenceError, match="the proxy cannot reach that network"):
                await (asyncio.to_thread(infer) if make is client_mod.Client else ainfer())
            assert len(proxied) == 1
    finally:
        await proxy_server.shutdown(1)
        await gateway.shutdown(1)


def test_a_model_name_is_one_path_segment_of_every_url_the_client_builds() -> None:
    """``a?x=1`` is that model, not model ``a`` with a query; ``..`` is not a step up. The
    gateway knows no model: the client asks it for the list, then for the inference."""
    asked: list[str] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            asked.append(self.path.split("?")[0])  # the request target as sent, not decoded
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_error(404)

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    with loopback.http_server(Gateway) as url, client_mod.Client(url) as c:
        for name, segment in (("a?x=1", "a%3Fx%3D1"), ("../sites/x", "..%2Fsites%2Fx"), ("..", "%2E%2E"), ("intent", "intent")):
            asked.clear()
            with pytest.raises(client_mod.NoEndpoint):
                c.infer(name, {"x": np.zeros(1, np.float32)})
            assert asked == [f"/v1/endpoints/{segment}", f"/v2/models/{segment}/infer"], asked


async def test_a_versioned_request_goes_to_the_replicas_that_hold_that_version() -> None:
    """During a rollout the table knows each edge replica's version: a request for one goes
    to the replicas that report it, however far down the ranking (the three nearest hold
    the old one here), then to replicas whose version is not known; no replica holding it
    is a 404 from the gateway naming the versions there are, without a call."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from orchestrator.gateway import endpoints, proxy, routing, upstream

    old_servers = [await answering(404, {"error": "no such version"}) for _ in range(3)]
    new, new_url = await v2_server("edge-far")
    table = endpoints.EndpointTable()
    table.replace([*(routing.Endpoint("m", "m", f"edge-{i}", "edge", "FR", "fr", 48.85, 2.35 + i / 100, url, version="aaaaaaaaaaaa")
                     for i, (_, url) in enumerate(old_servers)),
                   routing.Endpoint("m", "m", "edge-far", "edge", "DE", "de", 52.52, 13.40, new_url, version="bbbbbbbbbbbb")])
    pool = upstream.UpstreamPool()
    gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(CollectorRegistry()))
    body = oip.encode_request({"input": np.ones((1, 4), dtype=np.float32)})[0]
    try:
        transport = httpx.ASGITransport(app=Starlette(routes=gateway.routes()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            resp = await http.post("/v2/models/m/versions/bbbbbbbbbbbb/infer", content=body, headers={"x-edgeplane-location": "48.85,2.35"})
            assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-far", resp.text
            resp = await http.post("/v2/models/m/versions/cccccccccccc/infer", content=body, headers={"x-edgeplane-location": "48.85,2.35"})
            assert resp.status_code == 404, resp.text
            assert resp.json()["error"] == "model 'm' has no version 'cccccccccccc' (versions served: aaaaaaaaaaaa, bbbbbbbbbbbb)"
    finally:
        await pool.close()
        for server, _ in old_servers:
            await server.shutdown(1)
        await new.shutdown(1)


async def test_clients_of_two_residencies_sharing_a_cache_each_get_their_own_endpoint_list() -> None:
    """The list is the caller's: a client with no residency is sent to the German replica, and
    one of an FR residency that shares its cache must not take that list for its own."""
    (de, de_url), (fr, fr_url) = await v2_server("edge-de"), await v2_server("edge-fr")

    def listing(url: str, site: str) -> bytes:
        return json.dumps({"ttlSeconds": 600, "endpoints": [{"site": site, "url": url, "inferUrl": f"{url}/v2/models/m/infer"}]}).encode()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = listing(fr_url, "edge-fr") if b"residency=FR" in head.split(b"\r\n")[0] else listing(de_url, "edge-de")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    gateway_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    shared = client_mod.EndpointCache()
    x = np.ones((1, 2), dtype=np.float32)
    try:
        async with client_mod.AsyncClient(gateway_url, cache=shared) as anyone, \
                client_mod.AsyncClient(gateway_url, cache=shared, residency="FR") as french:
            assert (await anyone.infer("m", {"input": x})).site == "edge-de"
            assert (await french.infer("m", {"input": x})).site == "edge-fr"
            assert (await anyone.infer("m", {"input": x})).site == "edge-de"
    finally:
        server.close()
        await de.shutdown(1)
        await fr.shutdown(1)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_a_big_endian_array_is_sent_as_its_datatype_with_its_values(binary: bool) -> None:
    x = np.arange(-3, 3).astype(">f4")  # as np.frombuffer(raw, ">f4") reads network data
    server, url = await v2_server("edge")  # answers the input doubled
    try:
        async with client_mod.AsyncClient(url, direct=False, binary=binary, timeout=5) as c:
            result = await c.infer("m", {"input": x})
    finally:
        await server.shutdown(1)
    assert result["output"].dtype == np.float32 and result["output"].tolist() == (x * 2).tolist()


async def test_an_async_client_serves_one_event_loop_after_another() -> None:
    """``asyncio.run`` once per call (a script, a synchronous wrapper, a notebook cell run
    again): the second call took the connection the first loop had left in the pool and
    raised a bare ``RuntimeError('Event loop is closed')``; each loop has its own now."""
    server, url = await v2_server("edge-a")
    client = client_mod.AsyncClient(url, direct=False, timeout=5)

    async def doubled() -> list[float]:
        return (await client.infer("m", {"input": np.array([1.0, 2.0], np.float32)}))["output"].tolist()

    try:
        for _ in range(3):
            assert await asyncio.to_thread(asyncio.run, doubled()) == [2.0, 4.0]
        assert await doubled() == [2.0, 4.0]  # and this test's loop, still running, has its own
    finally:
        await client.aclose()
        await server.shutdown(1)


async def test_an_async_client_closed_refuses_to_send_more() -> None:
    """A call after ``aclose`` made the client a new HTTP client, whose connections no one
    would close; it raises, as the HTTP client's own did, and the client stays closed."""
    server, url = await v2_server("edge-a")
    client = client_mod.AsyncClient(url, direct=False, timeout=5)
    try:
        assert (await client.infer("m", {"input": np.ones(2, np.float32)})).site == "edge-a"
        await client.aclose()
        for _ in range(2):
            with pytest.raises(RuntimeError, match="closed"):
                await client.infer("m", {"input": np.ones(2, np.float32)})
        with pytest.raises(RuntimeError, match="closed"):
            [t async for t in client.chat("m", [{"role": "user", "content": "hi"}])]
        await client.aclose()  # closing again is no error
    finally:
        await server.shutdown(1)


async def test_an_async_client_reads_the_ca_certificates_once_not_on_each_event_loop_s_first_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each event loop's HTTP client is made on that loop, at its first request: reading the CA
    certificates there (tens of milliseconds) blocked every other task of the loop meanwhile."""
    reads = 0
    load = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        nonlocal reads
        reads += 1
        load(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    server, url = await v2_server("edge-a")
    client = client_mod.AsyncClient(url, direct=False, timeout=5)
    read_to_make = reads

    async def doubled() -> list[float]:
        return (await client.infer("m", {"input": np.array([1.0], np.float32)}))["output"].tolist()

    try:
        for _ in range(3):
            assert await asyncio.to_thread(asyncio.run, doubled()) == [2.0]
        assert await doubled() == [2.0]
    finally:
        await client.aclose()
        await server.shutdown(1)
    assert read_to_make >= 1 and reads == read_to_make


async def test_an_async_client_leaves_the_transport_it_was_given_open() -> None:
    """A transport given is the caller's, who may send through it elsewhere: closing the
    client closed it, for every client and loop using it."""
    class Recorded(httpx.AsyncHTTPTransport):
        closed = False

        async def aclose(self) -> None:
            self.closed = True
            await super().aclose()

    server, url = await v2_server("edge-a")
    transport = Recorded()
    try:
        async with client_mod.AsyncClient(url, direct=False, timeout=5, transport=transport) as client:
            assert (await client.infer("m", {"input": np.ones(1, np.float32)})).site == "edge-a"
        assert not transport.closed
    finally:
        await transport.aclose()
        await server.shutdown(1)
