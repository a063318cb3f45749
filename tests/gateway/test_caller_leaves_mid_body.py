"""A caller that goes away in the middle of its request body, over real HTTP: the gateway
ends the request quietly, with no traceback logged as if the gateway had failed, calls
no replica with half a body, and counts its answer (a 400) in its metrics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from orchestrator.api import methods
from orchestrator.gateway import endpoints, proxy, routing
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.testing import loopback

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("path", ["/v2/models/m/infer", "/v2/models/m/versions/1/infer"])
async def test_a_caller_leaving_mid_body_ends_the_request_without_an_error(path: str) -> None:
    table = endpoints.EndpointTable()
    # nothing listens on port 9: a replica called would be a failure the test sees in the table
    table.replace([routing.Endpoint(model="m", deployment="dep", site="edge-fr", tier="edge", country="FR", region="",
                                    lat=48.8, lon=2.3, url="http://127.0.0.1:9")])
    pool = UpstreamPool()
    registry = CollectorRegistry()
    gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
    inner = Starlette(routes=gateway.routes(), exception_handlers=methods.EXCEPTION_HANDLERS)
    raised: list[BaseException] = []
    done = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await inner(scope, receive, send)
        except BaseException as exc:  # what uvicorn would log as "Exception in ASGI application"
            raised.append(exc)
            raise
        finally:
            if scope["type"] == "http":
                done.set()

    try:
        async with loopback.serving(app) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n".encode()
                         + b'{"inputs": [' + b"1," * 100)
            await writer.drain()
            writer.close()  # half the body sent
            await asyncio.wait_for(done.wait(), 10)
    finally:
        await pool.close()
    assert raised == []
    assert table.ejected() == frozenset()
    assert registry.get_sample_value("edgeplane_gateway_requests_total", {"model": "m", "site": "", "code": "400"}) == 1
