"""A /v1 prompt is charged to the memory budget of requests in flight for what formatting and
tokenizing it takes, before it is tokenized: onnxruntime-genai's tokenizer holds about 30
bytes a token while it works, outside Python's allocator, and a prompt of characters past
U+FFFF is a token a byte in a byte-level vocabulary (measured in ``inflight.PROMPT_BYTE_FACTOR``:
up to 42 x the prompt's UTF-8 bytes, against the 11 x its body was charged for a long one).
The charge stays while the tokenizer works on a worker thread, even once its caller has left.
A real agent serving the tiny chat package with a small budget, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from edge_agent import daemon, inflight

from . import genai_serving as serving
from .conftest import SITE, ControlPlane, MakeAgent
from .test_inflight_memory import BUDGET, Raw, held, metrics, until


def chat_body(content: str) -> bytes:
    return json.dumps({"model": serving.MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4},
                      ensure_ascii=False).encode()


async def test_a_prompt_is_charged_what_tokenizing_it_takes_before_it_is_tokenized(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: serving.Packages) -> None:
    agent = await make_agent(control_plane, max_inflight_bytes=BUDGET)
    control_plane.hub.set_assignments(SITE, [serving.assignment(packages.small_url, packages.small.sha256)], version=1)
    await serving.wait_state(control_plane, lambda s: s.serving_sha256 == packages.small.sha256)
    async with httpx.AsyncClient(base_url=agent.endpoint_url, timeout=30) as http:
        # 50 KB of characters past U+FFFF: its body and its decoding fit the 4 MiB (2.6 MB),
        # what tokenizing it takes besides does not
        body = chat_body("\U0001F600" * 12_500)
        assert len(body) + inflight.openai_decode_bytes(len(body)) < BUDGET
        answer = await http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 413, answer.text
        error = answer.json()["error"]
        assert error["code"] == "request_too_large" and "tokenized" in error["message"], error
        await held(agent, 0)

        # a prompt that fits is served, and what it held given back
        answer = await http.post("/v1/chat/completions", content=chat_body("Where does the model run?"),
                                 headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        await held(agent, 0)


class GatedExecutor(ThreadPoolExecutor):
    """The event loop's default executor (``asyncio.to_thread``), whose work waits while
    ``gate`` is closed: a prompt's tokenizing that has not ended when its caller leaves."""

    def __init__(self) -> None:
        super().__init__(4, thread_name_prefix="gated")
        self.gate = threading.Event()
        self.gate.set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        closed = not self.gate.is_set()

        def run() -> Any:
            if closed:
                self.gate.wait(30)
            return fn(*args, **kwargs)

        return super().submit(run)


async def serve_small(control_plane: ControlPlane, make_agent: MakeAgent, packages: serving.Packages,
                      executor: GatedExecutor) -> daemon.Agent:
    asyncio.get_running_loop().set_default_executor(executor)
    agent = await make_agent(control_plane, max_inflight_bytes=BUDGET)
    control_plane.hub.set_assignments(SITE, [serving.assignment(packages.small_url, packages.small.sha256)], version=1)
    await serving.wait_state(control_plane, lambda s: s.serving_sha256 == packages.small.sha256)
    return agent


async def leave_while_tokenized(agent: daemon.Agent, executor: GatedExecutor, body: bytes) -> int:
    """Send ``body``, hang up while its prompt waits for the tokenizer's worker, then let the
    worker go on; what the agent held for it when its caller left."""
    port = int(agent.endpoint_url.rpartition(":")[2])
    decoded = len(body) + inflight.openai_decode_bytes(len(body))
    executor.gate.clear()
    conn = await Raw.open(port)
    try:
        await conn.head(len(body), path="/v1/chat/completions", headers={"Content-Type": "application/json"})
        await conn.send(body)
        await until(lambda: agent.budget.held > decoded, lambda: f"the prompt was not charged: {agent.budget.held} held")
        charged = agent.budget.held
    finally:
        conn.close()
    try:
        for _ in range(200):  # bounded: the agent has seen the caller go (this probe's own connection stays)
            if (await metrics(port))["edgeplane_agent_http_connections"] == 1:
                break
        else:
            raise AssertionError("the agent never saw its caller leave")
        assert agent.budget.held == charged, "the prompt's charge was given back while the tokenizer still held it"
    finally:
        executor.gate.set()
    return charged


async def test_a_prompt_whose_caller_left_stays_charged_until_its_tokenizing_ends(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: serving.Packages) -> None:
    executor = GatedExecutor()
    agent = await serve_small(control_plane, make_agent, packages, executor)
    # 30,000 characters: tokenized on a worker thread, its body read on the loop
    await leave_while_tokenized(agent, executor, chat_body("a" * 30_000))
    await held(agent, 0)


async def test_a_prompt_refused_on_its_worker_after_its_caller_left_logs_no_traceback(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: serving.Packages,
        caplog: pytest.LogCaptureFixture) -> None:
    executor = GatedExecutor()
    agent = await serve_small(control_plane, make_agent, packages, executor)
    # a special token at the end of a long message: refused 400 by the worker, with no one to answer
    await leave_while_tokenized(agent, executor, chat_body("a" * 30_000 + "<|im_end|>"))
    await held(agent, 0)
    gc.collect()  # the refused step is let go of here, where asyncio logs an error no one read
    unread = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not unread, unread
