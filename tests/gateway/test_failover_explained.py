"""An answer from a replica that is not the nearest says why when the reason is a failover:
``X-Edgeplane-Failover`` names the sites the request moved on from, in the order tried, on
the v2 and the OpenAI routes, and the access line carries them as ``failover``. Without it
an operator reading ``X-Edgeplane-Site: site-1`` for a caller next to ``site-0`` could not
tell a failover from a routing rule. Real HTTP on loopback; the replicas answer as agents do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeplane_proto import logformat
from orchestrator.gateway import correlation
from orchestrator.testing import loopback

from . import replica_gateway

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
INFER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
NEAR_SITE_0 = {"X-Edgeplane-Location": "48.85,2.35"}


async def failing(request: Request) -> Response:
    return Response(b'{"error": "boom"}', status_code=500, media_type="application/json")


async def answering(request: Request) -> Response:
    if request.url.path.startswith("/v1/"):
        return Response(json.dumps({"id": "c", "object": "chat.completion", "model": "llm", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}), media_type="application/json")
    return Response(json.dumps({"model_name": "m", "outputs": []}), media_type="application/json")


@contextlib.asynccontextmanager
async def gateway_over(*answers) -> AsyncIterator[httpx.AsyncClient]:  # noqa: ANN002
    """A gateway (its access log on) whose models m (v2) and llm (OpenAI) have a replica
    answering as ``answers[i]`` at site-i, each further east of the caller than the one before."""
    async with contextlib.AsyncExitStack() as stack:
        ports = [await stack.enter_async_context(loopback.serving(Starlette(routes=[Route("/{path:path}", a, methods=["POST"])])))
                 for a in answers]
        log = logformat.access_log(True, {"m", "llm"}.__contains__)
        yield await stack.enter_async_context(replica_gateway.gateway_at(ports, wrap=lambda app: correlation.Correlated(app, log)))


class Lines(logging.Handler):
    """The access lines written, awaited as they come: a line is written once the answer
    has been sent, so after the caller has it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: asyncio.Queue[logging.LogRecord] = asyncio.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.put_nowait(record)


@contextlib.contextmanager
def access_lines() -> Iterator[Lines]:
    lines, log = Lines(), logging.getLogger(logformat.ACCESS)
    level = log.level
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(lines)
        log.setLevel(level)


ROUTES = [pytest.param("/v2/models/m/infer", INFER, id="v2"), pytest.param("/openai/v1/chat/completions", CHAT, id="openai")]


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_an_answer_after_a_failover_names_the_sites_moved_on_from(path: str, body: dict) -> None:
    async with gateway_over(failing, failing, answering) as http:
        with access_lines() as lines:
            answer = await http.post(path, json=body, headers=NEAR_SITE_0)
            line = await asyncio.wait_for(lines.records.get(), 10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-edgeplane-site"] == "site-2"
    assert answer.headers["x-edgeplane-failover"] == "site-0,site-1"
    assert (line.site, line.failover) == ("site-2", "site-0,site-1")
    assert " failover=site-0,site-1" in logformat.TextFormatter().format(line)


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_an_answer_from_the_nearest_replica_has_no_failover(path: str, body: dict) -> None:
    async with gateway_over(answering, failing) as http:
        with access_lines() as lines:
            answer = await http.post(path, json=body, headers=NEAR_SITE_0)
            line = await asyncio.wait_for(lines.records.get(), 10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-edgeplane-site"] == "site-0"
    assert "x-edgeplane-failover" not in answer.headers
    assert line.failover is None
    assert "failover=" not in logformat.TextFormatter().format(line)


async def erring_before_its_first_token(request: Request) -> Response:
    """A stream that fails before any token reached the caller (the engine's error event)."""
    return Response(b'data: {"error": {"message": "engine died"}}\n\n', media_type="text/event-stream")


async def streaming(request: Request) -> Response:
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "llm",
             "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
    return Response(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(), media_type="text/event-stream")


async def test_a_streamed_answer_names_the_sites_it_moved_on_from_before_its_first_token() -> None:
    # the header goes with the stream's head, which waits for the first token: a replica that
    # failed before it (refused, or erred in its stream) is named; after it there is no failover
    async with gateway_over(failing, erring_before_its_first_token, streaming) as http:
        with access_lines() as lines:
            async with http.stream("POST", "/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=NEAR_SITE_0) as answer:
                body = (await answer.aread()).decode()
            line = await asyncio.wait_for(lines.records.get(), 10)
    assert answer.status_code == 200 and "[DONE]" in body, body
    assert answer.headers["x-edgeplane-site"] == "site-2"
    assert answer.headers["x-edgeplane-failover"] == "site-0,site-1"
    assert line.failover == "site-0,site-1"
