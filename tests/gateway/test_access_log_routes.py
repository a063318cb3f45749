"""The gateway's access line (``--access-log``) over a real uvicorn on loopback, as the
gateway serves: the route's template whatever the model is called, the model, the site
that answered (its ``X-Edgeplane-Site``), status and bytes; nothing of the caller. The
processes' own flags and JSON lines are tests/foundation/test_access_log.py's."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from edgeplane_proto import logformat
from orchestrator import runloop
from orchestrator.gateway import correlation


async def infer(request: Request) -> Response:
    body = await request.body()
    return Response(b"x" * (2 * len(body)), headers={"x-edgeplane-site": "edge-paris"})


async def live(_request: Request) -> Response:
    return Response(b"{}")


def app() -> Starlette:
    v2 = [Route("/v2/models/{model}/infer", infer, methods=["POST"]),
          Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
          Route("/v2/health/live", live)]
    return Starlette(routes=[*v2, Mount("/openai", routes=[Route("/v1/models/{model:path}", live)])])


@pytest.fixture
async def gateway() -> AsyncIterator[str]:
    known = {"mlp", "v2", "infer", "org/model-7b"}.__contains__  # the models the gateway's table has
    server = runloop.http_server(correlation.Correlated(app(), logformat.access_log(True, known)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await serving


@pytest.mark.parametrize(("method", "path", "route", "model", "site", "status"), [
    ("POST", "/v2/models/mlp/infer", "/v2/models/{model}/infer", "mlp", "edge-paris", 200),
    ("POST", "/v2/models/v2/infer", "/v2/models/{model}/infer", "v2", "edge-paris", 200),  # a model named as a literal part
    ("POST", "/v2/models/infer/infer", "/v2/models/{model}/infer", "infer", "edge-paris", 200),
    ("POST", "/v2/models/mlp/versions/3/infer", "/v2/models/{model}/versions/{version}/infer", "mlp", "edge-paris", 200),
    ("GET", "/v2/health/live", "/v2/health/live", None, None, 200),
    ("GET", "/openai/v1/models/org/model-7b", "/openai/v1/models/{model:path}", "org/model-7b", None, 200),
    ("GET", "/v2/models/carol@example.org/nowhere", None, None, None, 404),  # a path no route has: not written
    # a model the table does not know: its name is the caller's text, not written
    ("POST", "/v2/models/carol@example.org/infer", "/v2/models/{model}/infer", None, "edge-paris", 200),
    ("GET", "/openai/v1/models/carol@example.org", "/openai/v1/models/{model:path}", None, None, 200),
])
async def test_an_access_line_names_the_route_model_and_site(gateway: str, caplog: pytest.LogCaptureFixture, method: str, path: str,
                                                             route: str | None, model: str | None, site: str | None, status: int) -> None:
    body = b"0123456789" if method == "POST" else b""
    with caplog.at_level(logging.INFO, logformat.ACCESS):
        async with httpx.AsyncClient(base_url=gateway) as client:
            answer = await client.request(method, path + "?user=dave", content=body, headers={"X-Request-Id": "req-route-1"})
    assert answer.status_code == status
    [record] = [r for r in caplog.records if r.name == logformat.ACCESS]
    fields = {k: getattr(record, k) for k in ("request_id", "method", "route", "model", "site", "status", "bytes_in", "bytes_out")}
    assert fields == {"request_id": "req-route-1", "method": method, "route": route, "model": model, "site": site, "status": status,
                      "bytes_in": len(body), "bytes_out": len(answer.content)}
    assert record.duration_ms >= 0
    line = logformat.JsonFormatter().format(record)
    assert "127.0.0.1" not in line and "dave" not in line and "carol" not in line
