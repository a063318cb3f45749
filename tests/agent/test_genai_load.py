"""Generative models on an agent under load: what runs off the event loop while other
requests are answered, clients that leave during a prefill or a generation, and the running
and queued limits (429s, limits changed for a loaded model, a model unassigned mid-stream).
Same set-up as ``test_genai_openai``: a real agent, control plane and package server on loopback.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import openai
import pytest

from .conftest import SITE, ControlPlane, MakeAgent
from .genai_serving import MODEL, Packages, Serving, assignment, serve, token_count


async def answered_while_held(s: Serving, part: object, method: str, messages: list[dict[str, str]]) -> httpx.Response:
    """Post a chat of ``messages`` whose ``part.<method>`` (a model's, or a module's) is held
    until another request was answered (on the event loop, nothing could be answered until
    it ended); its answer."""
    held, release, returned = threading.Event(), threading.Event(), threading.Event()
    real = getattr(part, method)
    own = method in vars(part)

    def hold(*args, **kwargs):  # type: ignore[no-untyped-def]
        held.set()
        release.wait(10)
        try:
            return real(*args, **kwargs)
        finally:
            returned.set()

    setattr(part, method, hold)
    try:
        posted = asyncio.create_task(s.http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}))
        assert await asyncio.to_thread(held.wait, 30), f"the prompt never reached {method}"
        listed = await s.http.get("/v1/models")
        answered_while_held = not returned.is_set()
        release.set()
        answer = await posted
    finally:
        release.set()
        if own:
            setattr(part, method, real)
        else:
            delattr(part, method)
    assert listed.status_code == 200 and answered_while_held, f"nothing was answered while {method} ran"
    return answer


async def test_a_long_prompt_is_tokenized_while_the_agent_answers_other_requests(small: Serving) -> None:
    """A prompt over ``INLINE_PROMPT_CHARS`` is formatted and tokenized on a worker thread:
    the event loop answers meanwhile."""
    from edge_agent import generation

    content = "the edge site serves tokens " * (generation.INLINE_PROMPT_CHARS // 20)
    refused = await answered_while_held(small, small.agent.registry.get(MODEL).runtime, "encode", [{"role": "user", "content": content}])
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


async def test_a_large_body_is_read_while_the_agent_answers_other_requests(small: Serving) -> None:
    """A body over ``INLINE_BODY_BYTES`` is read as JSON and checked on a worker thread."""
    from edge_agent import generation, openai_api

    content = "the edge site serves tokens " * (generation.INLINE_BODY_BYTES // 20)
    refused = await answered_while_held(small, openai_api, "parse", [{"role": "user", "content": content}])
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


async def test_a_body_of_millions_of_keys_is_refused_before_it_is_built(small: Serving) -> None:
    """33 MiB holding 3 million ``metadata`` keys: read on a worker thread, the object was
    still made into a dict in one call holding the GIL (seconds, the event loop stalled
    whichever thread made it); it is refused while it is read, before it is built. The body
    ends in a syntax error that reading it to its end would report instead."""
    keys = b",".join(b'"%x":""' % i for i in range(3_000_000))
    raw = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"metadata":{%s,}}' % (MODEL.encode(), keys)
    del keys
    refused = await small.http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert refused.status_code == 400 and "wider than any these routes take" in refused.json()["error"]["message"], refused.text
    assert (await small.http.get("/v1/models")).status_code == 200


async def test_many_empty_messages_are_formatted_while_the_agent_answers_other_requests(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages) -> None:
    """Empty contents are no free prompt: what the template writes around each message is
    formatted and tokenized too, on a worker thread past ``INLINE_PROMPT_CHARS``."""
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256):
        messages = [{"role": "user", "content": ""}] * 2000  # within the context of 4,096 tokens
        answer = await answered_while_held(s, s.agent.registry.get(MODEL).runtime, "chat_prompt", messages)
        assert answer.status_code in (200, 400), answer.text


async def leave_once_running(s: Serving, body: dict[str, object]) -> None:
    """POST ``body`` to /v1/completions over a bare connection, and close it once the agent
    runs its generation (a client that left)."""
    host, port = s.agent.endpoint_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(payload), payload))
    for _ in range(1500):  # bounded: up to 30-75 s on a loaded machine
        if await s.metric("edgeplane_agent_generation_running", model=MODEL) == 1:
            break
        await asyncio.sleep(0.01)
    writer.close()


async def cancelled(s: Serving, n: int) -> None:
    """Wait (bounded: up to 30-75 s on a loaded machine) until ``n`` generations were counted
    cancelled and none runs; the caller asserts both."""
    for _ in range(1500):
        if await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == n \
                and await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0:
            return
        await asyncio.sleep(0.05)


async def test_a_client_that_disconnects_stops_its_generation(control_plane: ControlPlane, make_agent: MakeAgent,
                                                              packages: Packages) -> None:
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256):
        body = {"model": MODEL, "prompt": "The agent", "max_tokens": 4000, "temperature": 0, "stream": True}
        async with s.http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200 and response.headers["transfer-encoding"] == "chunked"
            lines = response.aiter_lines()
            got = 0
            async for line in lines:
                got += line.startswith("data: ")
                if got == 3:
                    break
        # The connection is closed: the generating thread sees the cancel within one step.
        await cancelled(s, 1)
        assert await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 1
        assert await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0
        generated = await s.metric("edgeplane_agent_completion_tokens_total", model=MODEL)
        assert 3 <= generated < 4000

        # Not streamed: the client leaves while the whole answer is being generated.
        await leave_once_running(s, {**body, "stream": False})
        await cancelled(s, 2)
        assert await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 2
        assert await s.metric("edgeplane_agent_completion_tokens_total", model=MODEL) < generated + 4000


async def test_a_client_that_disconnects_during_a_long_prefill_frees_its_slot_and_is_counted_cancelled(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages) -> None:
    """A client that leaves while its long prompt is read cancels its sequence: the slot is
    freed, the generation counted ``cancelled``, and no token made. That the read stops at the
    next chunk rather than at the prompt's end is shown on the runtime
    (``test_genai_units.test_a_cancel_while_a_long_prompt_is_read_stops_the_read_at_the_next_chunk``)."""
    prompt = "the edge site serves tokens quickly " * 230
    assert 2500 < token_count(packages.slow, prompt) < 4000
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256, concurrent=1):
        await leave_once_running(s, body)
        for _ in range(1500):
            if await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0:
                break
            await asyncio.sleep(0.01)
        assert await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0
        assert await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 1
        assert not await s.metric("edgeplane_agent_completion_tokens_total", model=MODEL)


async def test_tokens_made_slower_than_a_loop_wake_up_are_written_by_the_generating_thread(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages) -> None:
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256):
        whole = await s.client.completions.create(model=MODEL, prompt="The agent", max_tokens=24, temperature=0)
        generation = s.agent.server.generation
        assert generation.written_through == 0  # an answer that is not streamed is written by the loop
        stream = await s.client.completions.create(model=MODEL, prompt="The agent", max_tokens=24, temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        assert "".join(text) == whole.choices[0].text and len(text) == 24  # in order, one event per token
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
        # Each step computes for milliseconds: the thread wrote tokens itself (the first at
        # least; any the loop had not parked for went through the loop, in order).
        assert 1 <= generation.written_through <= 24


async def applied(s: Serving, version: int) -> None:
    for _ in range(1500):  # bounded: up to 30-75 s on a loaded machine
        if s.agent.registry.applied_version == version:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"the agent never applied assignment set {version}")


@asynccontextmanager
async def one_running_one_queued(s: Serving) -> AsyncIterator[tuple[AsyncIterator[str], asyncio.Task[httpx.Response]]]:
    """A long stream holding ``s``'s one slot (its first event read) and a whole request queued
    behind it: yields the stream's lines and the queued request; the stream's client leaves after."""
    body = {"model": MODEL, "prompt": "The agent", "max_tokens": 4000, "temperature": 0, "stream": True}
    async with s.http.stream("POST", "/v1/completions", json=body) as running:
        lines = running.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # it holds the one slot
        waiting = asyncio.create_task(s.http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3}))
        for _ in range(1000):  # bounded: up to 20-50 s on a loaded machine
            if await s.metric("edgeplane_agent_generation_queued", model=MODEL) == 1:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the second request never queued behind the running stream")
        yield lines, waiting


async def test_beyond_running_and_queued_requests_get_429_with_retry_after(control_plane: ControlPlane, make_agent: MakeAgent,
                                                                         packages: Packages) -> None:
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256, concurrent=1, queued=1):
        async with one_running_one_queued(s) as (_, waiting):
            assert await s.metric("edgeplane_agent_generation_running", model=MODEL) == 1
            with pytest.raises(openai.RateLimitError) as refused:
                await s.client.completions.create(model=MODEL, prompt="The agent", max_tokens=3)
            assert int(refused.value.response.headers["retry-after"]) >= 1
            assert refused.value.body["type"] == "rate_limit_error"
        # The stream's client left: the queued request gets the slot and is answered.
        answered = await asyncio.wait_for(waiting, 30)
        assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 3


async def test_new_limits_for_the_same_version_apply_to_the_loaded_model(control_plane: ControlPlane, make_agent: MakeAgent,
                                                                           packages: Packages) -> None:
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256, concurrent=4, queued=16):
        runtime = s.agent.registry.get(MODEL).runtime
        # The same artifact, one sequence at a time and none waiting now.
        control_plane.hub.set_assignments(SITE, [assignment(packages.slow_url, packages.slow.sha256, concurrent=1, queued=0)],
                                          version=2)
        await applied(s, 2)
        assert s.agent.registry.get(MODEL).runtime is runtime  # not loaded again
        # One sequence holds the one slot until let go (a tiny model's stream may end before a
        # second request arrives, freeing it).
        held, release = threading.Event(), threading.Event()
        real = runtime.generate

        def holding(*args, held=held, release=release, real=real, **kwargs):  # type: ignore[no-untyped-def]
            held.set()
            release.wait(30)
            return real(*args, **kwargs)

        runtime.generate = holding  # type: ignore[method-assign]
        try:
            first = asyncio.create_task(s.client.completions.create(model=MODEL, prompt="The agent", max_tokens=3))
            assert await asyncio.to_thread(held.wait, 30), "the first request never started generating"
            with pytest.raises(openai.RateLimitError):
                await s.client.completions.create(model=MODEL, prompt="The agent", max_tokens=3)
        finally:
            release.set()
            del runtime.generate
        assert (await first).usage.completion_tokens == 3  # type: ignore[union-attr]
        body = {"model": MODEL, "prompt": "The agent", "max_tokens": 4000, "temperature": 0, "stream": True}
        # Raised again: two run at once.
        control_plane.hub.set_assignments(SITE, [assignment(packages.slow_url, packages.slow.sha256, concurrent=2, queued=0)],
                                          version=3)
        await applied(s, 3)
        async with s.http.stream("POST", "/v1/completions", json=body) as running:
            assert (await anext(running.aiter_lines())).startswith("data: ")
            answer = await s.client.completions.create(model=MODEL, prompt="The agent", max_tokens=3)
            assert answer.usage is not None and answer.usage.completion_tokens == 3


async def test_an_unassigned_model_keeps_its_running_stream_refuses_its_queue_and_is_freed(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages) -> None:
    # The version is to be freed at once, not when the cycle collector gets to it (gigabytes,
    # for a real model): the collector is off for the test.
    gc.collect()
    gc.disable()
    try:
        async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256, concurrent=1, queued=1):
            runtime = weakref.ref(s.agent.registry.get(MODEL).runtime)
            async with one_running_one_queued(s) as (lines, waiting):
                threads = [t for t in threading.enumerate() if t.name.startswith("gen-chat")]
                assert threads

                control_plane.hub.set_assignments(SITE, [], version=2)
                refused = await asyncio.wait_for(waiting, 30)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "model_not_ready"
                more = 0
                async for line in lines:  # the running stream goes on
                    if line:
                        assert json.loads(line.removeprefix("data: "))["choices"][0]["finish_reason"] is None
                        more += 1
                        if more == 3:
                            break
                # counted as running until it ends
                assert await s.metric("edgeplane_agent_generation_running", model=MODEL) == 1
            # and ends as any other when its client leaves
            assert (await s.http.get(f"/v1/models/{MODEL}")).status_code == 404
            # nothing holds the version any more: its threads end and its weights are freed
            for thread in threads:
                await asyncio.to_thread(thread.join, 30)
                assert not thread.is_alive()
            assert runtime() is None
            # the model's series went with its assignment, and what ended since did not bring them back
            assert f'model="{MODEL}"' not in (await s.http.get("/metrics")).text
    finally:
        gc.enable()
