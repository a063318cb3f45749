"""The OpenAI-compatible routes and the HTTP layer under them: bodies over the agent's
limit, compressed bodies, chunked bodies and malformed requests, over real HTTP to a real
agent (in process) serving the tiny generative package of ``test_genai_openai``, with the
official ``openai`` SDK where it can send the request. Every refusal is OpenAI's error
object, which the SDK reads (``APIStatusError.body``, ``.code``), and the model goes on
serving.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from orchestrator.agents import model

from .conftest import SITE, ControlPlane, MakeAgent
from .genai_serving import MODEL, USER, Packages, Serving, assignment, wait_state
from .test_httpserver import read_response
from .test_openai_bad_input import error_of, still_serves

LIMIT = 64 * 1024  # the agent's --max-request-bytes here: far above what a chat needs
CHAT = {"model": MODEL, "messages": USER, "max_tokens": 3, "temperature": 0}
PROMPT = {"model": MODEL, "prompt": "The agent", "max_tokens": 3, "temperature": 0}


@pytest.fixture
async def agent(control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages,  # noqa: F811
                caplog: pytest.LogCaptureFixture) -> AsyncIterator[Serving]:
    caplog.set_level(logging.WARNING)
    served = await make_agent(control_plane, max_body_bytes=LIMIT)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    control_plane.hub.set_assignments(SITE, [assignment(packages.small_url, packages.small.sha256)], version=1)
    await wait_state(control_plane, lambda s: s.serving_sha256 == packages.small.sha256)
    client = openai.AsyncOpenAI(base_url=f"{served.endpoint_url}/v1", api_key="unused", max_retries=0, timeout=30)
    async with httpx.AsyncClient(base_url=served.endpoint_url, timeout=30) as http:
        yield Serving(served, client, http)
    await client.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


def answer_text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


# --- bodies over the limit ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [LIMIT + 1000, 16 * 1024 * 1024], ids=["just-over", "over-the-socket-buffers"])
async def test_a_body_over_the_limit_is_a_413_the_sdk_reads(agent: Serving, size: int) -> None:
    """Refused by the HTTP server from Content-Length, before any route: the SDK got the v2
    routes' ``{"error": "..."}`` (no code, no type), or, for a body larger than the socket
    buffers, a reset connection (``APIConnectionError``) in place of the answer."""
    with pytest.raises(openai.APIStatusError) as chat:
        await agent.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * size}])
    with pytest.raises(openai.APIStatusError) as completion:
        await agent.client.completions.create(model=MODEL, prompt="x" * size, stream=True)
    for refused in (chat.value, completion.value):
        assert refused.status_code == 413
        assert refused.body == {"message": f"request body exceeds {LIMIT} bytes", "type": "invalid_request_error",
                                "param": None, "code": "request_too_large"}
        assert refused.code == "request_too_large" and f"request body exceeds {LIMIT} bytes" in refused.message
    await still_serves(agent)


async def test_a_chunked_body_over_the_limit_is_a_413_openai_error(agent: Serving) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield json.dumps(CHAT).encode()[:-1] + b', "user": "'
        for _ in range(8):
            yield b"x" * (LIMIT // 4)
        yield b'"}'

    error = error_of(await agent.http.post("/v1/chat/completions", content=pieces()), 413)
    assert error["code"] == "request_too_large" and error["message"] == f"request body exceeds {LIMIT} bytes"
    await still_serves(agent)


async def test_a_chunked_body_under_the_limit_is_served(agent: Serving) -> None:
    raw = json.dumps(CHAT).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(raw), 7):
            yield raw[at:at + 7]

    chunked = await agent.http.post("/v1/chat/completions", content=pieces())
    assert "transfer-encoding" in chunked.request.headers
    assert answer_text(chunked) == answer_text(await agent.http.post("/v1/chat/completions", content=raw))


# --- compressed bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "compress"), [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("GZip", gzip.compress),
    ("identity", lambda b: b),
])
async def test_a_compressed_body_is_inflated_as_on_the_v2_routes(agent: Serving, encoding: str, compress: Any) -> None:
    plain = await agent.client.chat.completions.create(**CHAT)
    headers = {"content-encoding": encoding, "content-type": "application/json"}
    chat = await agent.http.post("/v1/chat/completions", content=compress(json.dumps(CHAT).encode()), headers=headers)
    assert answer_text(chat) == plain.choices[0].message.content
    completion = await agent.http.post("/v1/completions", content=compress(json.dumps(PROMPT).encode()), headers=headers)
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 3, completion.text
    stream = await agent.http.post("/v1/chat/completions", content=compress(json.dumps({**CHAT, "stream": True}).encode()),
                                   headers=headers)
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize(("encoding", "body", "status", "code", "said"), [
    ("br", json.dumps(CHAT).encode(), 415, "unsupported_content_encoding", "Content-Encoding 'br' is not supported"),
    ("gzip", json.dumps(CHAT).encode(), 400, "invalid_content_encoding", "body is not valid gzip"),
    ("gzip", gzip.compress(json.dumps(CHAT).encode())[:-9], 400, "invalid_content_encoding", "truncated"),
    ("deflate", zlib.compress(b" " * (LIMIT + 1)), 413, "request_too_large", f"exceeds {LIMIT} bytes once inflated"),
    ("gzip", gzip.compress(b" " * (LIMIT * 64)), 413, "request_too_large", f"exceeds {LIMIT} bytes once inflated"),  # off the loop
])
async def test_a_compressed_body_is_refused_as_on_the_v2_routes(agent: Serving, encoding: str, body: bytes, status: int,
                                                                 code: str, said: str) -> None:
    for route in ("/v1/chat/completions", "/v1/completions"):
        resp = await agent.http.post(route, content=body, headers={"content-encoding": encoding})
        error = error_of(resp, status)
        assert error["code"] == code and said in error["message"] and error["type"] == "invalid_request_error"
        assert resp.headers.get("accept-encoding") == ("gzip, deflate" if status == 415 else None)  # what it takes, RFC 9110
    await still_serves(agent)


async def test_the_sdk_reads_the_415_of_an_encoding_the_agent_does_not_take(agent: Serving) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        await agent.client.chat.completions.create(**CHAT, extra_headers={"content-encoding": "zstd"})
    assert refused.value.status_code == 415 and refused.value.code == "unsupported_content_encoding"
    assert "(gzip, deflate or identity)" in refused.value.body["message"]


# --- other requests that are not what the routes take ---------------------------------------


@pytest.mark.parametrize(("content_type", "body", "status"), [
    ("text/plain", json.dumps(CHAT).encode(), 200),  # a JSON body is read as JSON, as the gateway does
    ("application/x-www-form-urlencoded", json.dumps(CHAT).encode(), 200),  # curl -d without -H
    (None, json.dumps(CHAT).encode(), 200),
    ("application/x-www-form-urlencoded", b"model=chat&prompt=hi", 400),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=model\r\n\r\nchat\r\n--x--\r\n", 400),
    ("application/json", b"", 400),
    ("application/json", b"\xff\xfe{}", 400),
])
async def test_whatever_the_content_type_the_answer_is_the_route_s(agent: Serving, content_type: str | None, body: bytes,
                                                                   status: int) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = await agent.http.post("/v1/chat/completions", content=body, headers=headers)
    if status == 200:
        answer_text(resp)
    else:
        assert "not valid JSON" in error_of(resp, status)["message"]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1", 404, "not_found"),  # the SDK's base URL itself
    ("POST", "/v1", 404, "not_found"),
    ("GET", "/v1/", 404, "not_found"),
    ("POST", "/v1/embeddings", 404, "not_found"),  # a route these agents do not have
    ("OPTIONS", "/v1/chat/completions", 405, "method_not_allowed"),
    ("PATCH", "/v1/completions", 405, "method_not_allowed"),
])
async def test_no_such_v1_route_is_an_openai_error(agent: Serving, method: str, path: str, status: int, code: str) -> None:
    assert error_of(await agent.http.request(method, path), status)["code"] == code
    # a body in an encoding the agent does not read changes nothing: there is no route to read it
    assert error_of(await agent.http.request(method, path, content=b"{}", headers={"content-encoding": "br"}), status)["code"] == code


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413, "request_too_large"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "malformed_request"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nnope\r\n", 400,
     "malformed_request"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400, "upgrade_not_supported"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * (65 * 1024) + b"\r\n\r\n", 431, "request_head_too_large"),
])
async def test_a_malformed_request_to_v1_is_an_openai_error(agent: Serving, raw: bytes, status: int, code: str) -> None:
    host, port = agent.agent.endpoint_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        got, headers, body = await read_response(reader)
        error = json.loads(body)["error"]
        assert got == status and headers["connection"] == "close"
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    finally:
        writer.close()
    await still_serves(agent)
