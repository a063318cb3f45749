"""Bad input on the gateway's OpenAI-compatible routes, at the control plane (``/openai/v1``,
and the SDK's ``/v1`` completions) and at a standalone gateway (``/openai/v1`` and ``/v1``):
every refusal is OpenAI's error object, the routing ones (405 with ``Allow``, 404) included,
while the other routes keep their own ``{"error": "..."}``; nothing is logged as an error,
and a bad request never costs the replica its place in the routing.

One real control plane, one real agent process (Paris) serving the tiny generative model
``chat``, and a standalone gateway (in process) following the control plane.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from orchestrator.gatewayd import server as gatewayd
from orchestrator.testing import genai_model, harness, manifests

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITES = {"edge-paris": dict(country="FR", region="fr", lat=48.8566, lon=2.3522)}
USER = [{"role": "user", "content": "Where does the model run?"}]
CHAT = {"model": "chat", "messages": USER, "max_tokens": 2}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[harness.Fleet]:
    root = tmp_path_factory.mktemp("gw-openai-bad-input")
    chat = genai_model.build_package(root / "artifacts", name="chat")
    variant = {"name": "small", **chat.manifest_fields(), "resources": {"cpu": 0.25}}
    variant["artifact"] = {"uri": "chat.tar", "sha256": chat.sha256}
    body = manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in SITES.items()),
        manifests.doc("Model", "chat", {"variants": [variant]}),
        manifests.deployment("chat-fr", "chat", 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )
    async with harness.serving_fleet(root, body, SITES, ready=lambda cp: len(cp.table.endpoints("chat")) == 1,
                                     what="chat in Paris", timeout=90) as f:
        yield f


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(fleet: harness.Fleet) -> AsyncIterator[gatewayd.StandaloneGateway]:
    assert fleet.cp is not None
    async with harness.following_gateway(fleet.cp.http_url) as gw:
        yield gw


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def no_errors_logged() -> Iterator[None]:
    """Fails the test if anything logs an error: uvicorn's tracebacks go to its own logger,
    which does not propagate to the root."""
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not handler.records, [f"{r.name}: {r.getMessage()}" for r in handler.records]


def bases(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway) -> dict[str, str]:
    assert fleet.cp is not None
    return {"control plane": f"{fleet.cp.http_url}/openai/v1", "control plane, SDK layout": f"{fleet.cp.http_url}/v1",
            "standalone": f"{gateway.http_url}/openai/v1", "standalone, SDK layout": f"{gateway.http_url}/v1"}


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, resp.text
    return error


async def still_serves(base: str) -> None:
    async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=2, temperature=0)  # type: ignore[arg-type]
        assert raw.headers["x-edgeplane-site"] == "edge-paris" and raw.parse().usage.completion_tokens == 2  # type: ignore[union-attr]


# --- routes ------------------------------------------------------------------------------------


WRONG = [  # (where, method, path under the base, allowed methods: None for no such path)
    ("", "GET", "/chat/completions", "POST"),
    ("", "PUT", "/completions", "POST"),
    ("not sdk cp", "DELETE", "/models", "GET, HEAD"),
    ("not sdk cp", "POST", "/models/chat", "GET, HEAD"),
    ("not sdk cp", "POST", "/embeddings", None),
    ("not sdk cp", "GET", "/nothing/here", None),
]


@pytest.mark.parametrize(("where", "method", "path", "allow"), WRONG)
async def test_a_wrong_method_or_path_is_an_openai_error(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway, where: str,
                                                         method: str, path: str, allow: str | None, no_errors_logged: None) -> None:
    for name, base in bases(fleet, gateway).items():
        if where == "not sdk cp" and name == "control plane, SDK layout":  # there /v1 is the control API's
            continue
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.request(method, f"{base}{path}", json=CHAT if method in ("POST", "PUT") else None)
        full = urllib.parse.urlsplit(f"{base}{path}").path
        error = error_of(resp, 405 if allow else 404)
        assert error["type"] == "invalid_request_error", (name, resp.text)
        if allow:
            assert resp.headers["allow"] == allow and error["code"] == "method_not_allowed", (name, resp.text)
            assert error["message"] == f"{method} is not allowed on {full}; it takes {allow}"
        else:
            assert error["code"] == "not_found" and error["message"] == f"no such endpoint: {method} {full}", (name, resp.text)


async def test_the_sdk_reads_the_refusals(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway) -> None:
    for base in (f"{gateway.http_url}/v1", f"{gateway.http_url}/openai/v1"):
        async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30) as sdk:
            with pytest.raises(openai.NotFoundError) as missing:
                await sdk.embeddings.create(model="chat", input="hi")
            assert missing.value.code == "not_found" and missing.value.body["type"] == "invalid_request_error"  # type: ignore[index]
            with pytest.raises(openai.APIStatusError) as wrong:
                await sdk.get("/chat/completions", cast_to=httpx.Response)
            assert wrong.value.status_code == 405 and wrong.value.code == "method_not_allowed"


async def test_the_other_routes_keep_their_own_errors(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway) -> None:
    assert fleet.cp is not None
    async with httpx.AsyncClient(timeout=30) as http:
        control = await http.delete(f"{fleet.cp.http_url}/v1/models")  # the control API's Model list
        unknown = await http.get(f"{gateway.http_url}/v9/nothing")
        endpoints = await http.post(f"{gateway.http_url}/v1/endpoints/chat")
        listed = await http.get(f"{gateway.http_url}/v1/endpoints/chat")  # not taken by the SDK layout's 404
    assert control.status_code == 405 and control.json() == {"error": "DELETE is not allowed on /v1/models; it takes GET, HEAD",
                                                          "reason": "MethodNotAllowed"}
    assert unknown.status_code == 404 and unknown.json() == {"error": "no route for GET /v9/nothing", "reason": "NoRoute"}
    assert endpoints.status_code == 405 and endpoints.json() == {"error": "POST is not allowed on /v1/endpoints/chat; it takes GET, HEAD",
                                                              "reason": "MethodNotAllowed"}
    assert listed.status_code == 200 and listed.json()["endpoints"][0]["site"] == "edge-paris"


# --- bodies ------------------------------------------------------------------------------------


async def test_bodies_the_gateway_reads_itself(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway, no_errors_logged: None) -> None:
    for base in bases(fleet, gateway).values():
        async with httpx.AsyncClient(timeout=60) as http:
            deep = await http.post(f"{base}/chat/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
            assert "nested too deeply" in error_of(deep, 400)["message"]  # was a 500 and a traceback
            array = await http.post(f"{base}/completions", json=[CHAT])
            assert error_of(array, 400)["param"] is None
            null = await http.post(f"{base}/chat/completions", json={**CHAT, "stream": None})  # OpenAI's default, as the replica reads it
            assert null.status_code == 200 and null.json()["usage"]["completion_tokens"] == 2, null.text
            huge = await http.post(f"{base}/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "x" * (17 << 20)}]})
            assert error_of(huge, 413)["message"] == "request body is larger than 16 MiB"


async def test_a_compressed_body_is_inflated_as_the_agent_does(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway) -> None:
    """gzip and deflate bodies are read as the agent reads them, under the same limit; an
    encoding the gateway cannot read is a 415, a damaged body a 400, a bomb a 413."""
    plain = json.dumps(CHAT).encode()
    for base in bases(fleet, gateway).values():
        async with httpx.AsyncClient(timeout=60) as http:
            for encoding, body in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain)), ("identity", plain)):
                resp = await http.post(f"{base}/chat/completions", content=body,
                                       headers={"content-type": "application/json", "content-encoding": encoding})
                assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2, (encoding, resp.text)
            for encoding, body, status, code in (("br", plain, 415, "unsupported_content_encoding"),
                                                 ("gzip", gzip.compress(plain)[:-9], 400, "invalid_content_encoding"),
                                                 ("deflate", zlib.compress(bytes(17 << 20)), 413, "request_too_large")):
                resp = await http.post(f"{base}/chat/completions", content=body,
                                       headers={"content-type": "application/json", "content-encoding": encoding})
                assert error_of(resp, status)["code"] == code, (encoding, resp.text)
                assert resp.headers.get("accept-encoding") == ("gzip, deflate" if status == 415 else None)


@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": 10 ** 400}, "temperature"),  # the replica answered 500: the gateway ejected it, and every caller got 503
    ({"top_p": -(10 ** 400)}, "top_p"),
    ({"unknown_field": True}, "unknown_field"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
async def test_the_replicas_refusal_reaches_the_caller_and_the_replica_keeps_serving(
        fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway, extra: dict[str, Any], param: str, no_errors_logged: None) -> None:
    for base in bases(fleet, gateway).values():
        async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60) as sdk:
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as refused:
                    await sdk.chat.completions.create(model="chat", messages=USER, max_tokens=2, stream=stream,  # type: ignore[arg-type]
                                                      extra_body=extra)
                assert refused.value.param == param and refused.value.response.headers["x-edgeplane-site"] == "edge-paris"
        await still_serves(base)


def request_tasks(owner: Any) -> set[asyncio.Task[None]]:
    """The tasks answering requests on ``owner``'s HTTP server (a control plane or a
    standalone gateway), one each. Read through its private uvicorn server: neither shows
    the requests it is answering, and the test waits for one that lost its caller to end."""
    return owner._uvicorn.server_state.tasks


async def test_a_caller_gone_before_its_body_arrived_is_no_error(fleet: harness.Fleet, gateway: gatewayd.StandaloneGateway,
                                                                no_errors_logged: None) -> None:
    assert fleet.cp is not None
    for base, owner in ((f"{fleet.cp.http_url}/openai/v1", fleet.cp), (f"{gateway.http_url}/v1", gateway)):
        tasks = request_tasks(owner)
        before = set(tasks)
        url = urllib.parse.urlsplit(base)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(f"POST {url.path}/chat/completions HTTP/1.1\r\nhost: {url.netloc}\r\ncontent-type: application/json\r\n"
                     "content-length: 100000\r\n\r\n".encode() + b'{"model": "chat", "messages": [')
        await writer.drain()
        answering = await harness.wait_until(lambda tasks=tasks, before=before: tasks - before, 30, what="the gateway to start answering")
        writer.close()
        await writer.wait_closed()
        done, _ = await asyncio.wait(answering, timeout=30)  # it saw the caller go (a traceback would be logged by now)
        assert done == answering
        await still_serves(base)
