"""The built-in onnx-genai Serve application takes the request bodies an edge agent takes
and refuses those it refuses, alike: the gateway forwards a compressed body as it came and
fails over between the tiers, so a body one tier reads and the other refuses would be
answered by chance. Driven in-process over ASGI, without a Ray cluster."""

from __future__ import annotations

import gzip
import json
import pathlib
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import edge_agent
from orchestrator.serving import genai_app
from orchestrator.testing import genai_model

CHAT = {"model": "assistant", "messages": [{"role": "user", "content": "Where does the model run?"}], "max_tokens": 4,
        "temperature": 0}
LIMIT = edge_agent.DEFAULT_MAX_REQUEST_BYTES  # the agent's, as sent and once inflated
ROUTES = ("/ep/chat/v1/chat/completions", "/ep/chat/v1/completions")


@pytest.fixture
async def replica(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                  genai_package: genai_model.GenAIModel) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("EDGEPLANE_ARTIFACT_CACHE", str(tmp_path))
    served = genai_app.GenAIReplica.func_or_class(genai_package.package.as_uri(), genai_package.sha256, "assistant")

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        response = await served(Request(scope, receive))
        await response(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://replica", timeout=60) as client:
        yield client


def error_of(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, (answer.status_code, answer.text[:200])
    return answer.json()["error"]


@pytest.mark.parametrize(("coding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress), ("identity", lambda b: b)])
async def test_a_compressed_chat_is_answered_as_the_plain_one(replica: httpx.AsyncClient, coding: str, compress: Any) -> None:
    plain = await replica.post(ROUTES[0], json=CHAT)
    assert plain.status_code == 200, plain.text
    compressed = await replica.post(ROUTES[0], content=compress(json.dumps(CHAT).encode()),
                                    headers={"content-encoding": coding, "content-type": "application/json"})
    assert compressed.status_code == 200, compressed.text
    assert compressed.json()["choices"] == plain.json()["choices"]


@pytest.mark.parametrize(("coding", "body", "status", "code"), [
    ("br", json.dumps(CHAT).encode(), 415, "unsupported_content_encoding"),
    ("gzip", json.dumps(CHAT).encode(), 400, "invalid_content_encoding"),
    ("gzip", gzip.compress(b" " * (LIMIT + 1)), 413, "request_too_large"),
])
async def test_a_compressed_body_is_refused_as_the_agent_refuses_it(replica: httpx.AsyncClient, coding: str, body: bytes,
                                                                    status: int, code: str) -> None:
    for route in ROUTES:
        answer = await replica.post(route, content=body, headers={"content-encoding": coding})
        error = error_of(answer, status)
        assert error["code"] == code and error["type"] == "invalid_request_error", error
        assert answer.headers.get("accept-encoding") == ("gzip, deflate" if status == 415 else None)


async def test_a_body_over_the_agents_limit_is_a_413_unread(replica: httpx.AsyncClient) -> None:
    read = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal read
        while read < LIMIT + (8 << 20):
            read += 1 << 20
            yield b" " * (1 << 20)

    answer = await replica.post(ROUTES[0], content=chunks())  # chunked: no length to refuse it by
    error = error_of(answer, 413)
    assert error["code"] == "request_too_large" and f"exceeds {LIMIT} bytes" in error["message"]
    assert read <= LIMIT + (2 << 20)  # not read to its end
