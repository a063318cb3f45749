"""Generative models on an agent, through the official ``openai`` SDK.

A real agent (in process) joins a real control-plane gRPC server on loopback, is assigned
a ``runtime: onnx-genai`` package served over real HTTP, verifies, unpacks and loads it
with onnxruntime-genai, and answers ``/v1`` — streamed and not — to ``openai.AsyncOpenAI``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from edge_agent import registry
from edgeplane_proto.inference.v2 import inference_pb2 as pb
from edgeplane_proto.inference.v2 import inference_pb2_grpc as pb_grpc
from orchestrator.agents import model
from orchestrator.testing import genai_model, harness

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent

MODEL = "chat"
USER = [{"role": "user", "content": "Where does the model run?"}]


@dataclass(frozen=True)
class Packages:
    small: genai_model.GenAIModel  # context 256, fast
    slow: genai_model.GenAIModel  # context 4096, with per-token compute: long generations to interrupt
    small_url: str
    slow_url: str


@pytest.fixture(scope="session")
def packages(artifact_server: ArtifactServer) -> Packages:
    small = genai_model.build_package(artifact_server.root, name="tiny-chat")
    slow = genai_model.build_package(artifact_server.root, name="slow-chat", context_length=4096, ffn_layers=4, ffn_repeat=32,
                                     embed_dim=256, ffn_dim=1024, seed=1)
    return Packages(small, slow, artifact_server.url("tiny-chat.tar"), artifact_server.url("slow-chat.tar"))


def assignment(url: str, sha256: str, *, concurrent: int = 4, queued: int = 16) -> model.Assignment:
    return model.Assignment(MODEL, "assistant", "small", url, sha256, runtime="onnx-genai",
                            max_concurrent_sequences=concurrent, max_queued=queued)


async def wait_state(cp: ControlPlane, predicate) -> model.ModelState:
    def match(event: model.AgentEvent) -> bool:
        state = event.status.models.get(MODEL)
        return event.kind is model.AgentEventKind.MODELS_CHANGED and state is not None and predicate(state)

    return (await cp.events.wait_for(match, timeout=30)).status.models[MODEL]


@dataclass
class Serving:
    agent: object
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.http.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


async def serve(cp: ControlPlane, make_agent: MakeAgent, url: str, sha256: str, **limits: int) -> AsyncIterator[Serving]:
    agent = await make_agent(cp)
    await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    cp.hub.set_assignments(SITE, [assignment(url, sha256, **limits)], version=1)
    await wait_state(cp, lambda s: s.serving_sha256 == sha256)
    client = openai.AsyncOpenAI(base_url=f"{agent.endpoint_url}/v1", api_key="unused", max_retries=0, timeout=30)
    async with httpx.AsyncClient(base_url=agent.endpoint_url, timeout=30) as http:
        yield Serving(agent, client, http)
    await client.close()


@pytest.fixture
async def small(control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages) -> AsyncIterator[Serving]:
    async for s in serve(control_plane, make_agent, packages.small_url, packages.small.sha256):
        yield s


def chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def token_count(pkg: genai_model.GenAIModel, text: str) -> int:
    return len(Tokenizer.from_file(str(pkg.directory / "tokenizer.json")).encode(text).ids)


# --- the protocol ------------------------------------------------------------------------------


async def test_models_lists_the_generative_model(small: Serving) -> None:
    listed = await small.client.models.list()
    assert [m.id for m in listed.data] == [MODEL]


async def test_stream_sends_one_chunk_per_token_and_the_usage(small: Serving, packages: Packages) -> None:
    whole = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    stream = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content) == 12  # one chunk per generated token
    assert "".join(content) == whole.choices[0].message.content  # the same greedy answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    prompt_tokens = token_count(packages.small, chatml(USER))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_tokens, 12, prompt_tokens + 12)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 12)
    assert whole.choices[0].finish_reason == "length" and whole.object == "chat.completion"


async def test_stop_string_ends_the_answer_before_it(small: Serving) -> None:
    free = (await small.client.completions.create(model=MODEL, prompt="The agent", max_tokens=30, temperature=0)).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip(), free
    cut = free[:free.index(stop)]
    whole = await small.client.completions.create(model=MODEL, prompt="The agent", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 30
    streamed = await small.client.completions.create(model=MODEL, prompt="The agent", max_tokens=30, temperature=0, stop=stop,
                                                      stream=True)
    parts = [c async for c in streamed]
    assert "".join(c.choices[0].text for c in parts) == cut
    assert parts[-1].choices[0].finish_reason == "stop"


async def test_max_tokens_bounds_the_answer(small: Serving) -> None:
    for n in (1, 5):
        r = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=n, temperature=0)
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"


async def test_logprobs_and_top_logprobs(small: Serving) -> None:
    r = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    plain = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].message.content  # asking for logprobs changes nothing
    assert len(items) == 4 and "".join(i.token for i in items) == r.choices[0].message.content
    for item in items:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert item.logprob == pytest.approx(tops[0])  # greedy picks the most likely token


async def test_a_token_that_is_part_of_a_character_gives_its_own_bytes(small: Serving) -> None:
    """The tiny model's byte-level vocabulary has a token per byte (0xC3 and 0xA9 make "é"),
    each unlikely enough to be among the 20 likeliest at every step, none text alone. A
    client joins the ``bytes`` of such tokens into characters: they must be the token's
    own, not those of U+FFFD, and its ``token`` shows them (``bytes:\\xc3``)."""
    asked = {"model": MODEL, "messages": USER, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 20}
    whole = await small.client.chat.completions.create(**asked)
    streamed = [c async for c in await small.client.chat.completions.create(**asked, stream=True)]
    items = whole.choices[0].logprobs.content
    assert [i.model_dump() for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content] == \
        [i.model_dump() for i in items]
    partial = 0
    for item in items:
        tops = item.top_logprobs
        assert len({t.token for t in tops}) == len({bytes(t.bytes) for t in tops}) == 20  # no two the same
        for t in [item, *tops]:
            try:
                assert bytes(t.bytes).decode() == t.token
            except UnicodeDecodeError:
                partial += 1
                assert len(t.bytes) == 1 and t.bytes[0] >= 0x80, t  # one byte of a character, alone
                assert t.token == f"bytes:\\x{t.bytes[0]:02x}", t
    assert partial >= len(items)


async def test_seed_makes_sampling_reproducible(small: Serving) -> None:
    async def sample(seed: int) -> str:
        r = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return r.choices[0].message.content

    first = await sample(7)
    assert await sample(7) == first
    assert {await sample(s) for s in (1, 2, 3)} != {first}


async def test_seeds_that_differ_beyond_the_sampler_s_31_bits_sample_differently(small: Serving) -> None:
    """OpenAI's ``seed`` is 64-bit; the library's sampler takes 31 bits. Seeds that differ
    only past them (or in their sign) sampled alike; each samples as itself now, and the
    same seed alike every time."""
    async def sample(seed: int) -> str:
        r = await small.client.completions.create(model=MODEL, prompt="The agent", max_tokens=24, temperature=2.0, seed=seed)
        return r.choices[0].text

    seeds = (5, 5 + (1 << 31), 5 - (1 << 31), 5 - (1 << 63), (1 << 64) - 1)
    texts = [await sample(seed) for seed in seeds]
    assert len(set(texts)) == len(seeds), texts
    assert [await sample(seed) for seed in seeds[1:]] == texts[1:]


async def test_a_top_k_past_the_vocabulary_samples_among_every_token(small: Serving, packages: Packages) -> None:
    vocabulary = json.loads((packages.small.directory / "genai_config.json").read_text())["model"]["vocab_size"]

    async def sample(top_k: int, **stream: bool) -> str:
        r = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=1.0, seed=7,
                                                       extra_body={"top_k": top_k}, **stream)
        if isinstance(r, openai.AsyncStream):
            return "".join([c.choices[0].delta.content or "" async for c in r if c.choices])
        return r.choices[0].message.content

    every = await sample(vocabulary)
    assert every and await sample(vocabulary * 1000) == every
    assert await sample(vocabulary + 1, stream=True) == every


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": "hi"}, "messages"),
        ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
        ({"messages": USER, "temperature": 5}, "temperature"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "stop": [1, 2]}, "stop"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ],
)
async def test_bad_bodies_get_400_naming_the_field(small: Serving, body: dict, param: str) -> None:
    response = await small.http.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


async def test_errors_are_openai_error_objects(small: Serving) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await small.client.chat.completions.create(model="nope", messages=USER)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        await small.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the model " * 200}])
    assert long.value.body["code"] == "context_length_exceeded" and "maximum context length is 256 tokens" in long.value.body["message"]
    with pytest.raises(openai.BadRequestError) as over:
        await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=250)
    assert over.value.body["param"] == "max_tokens"
    raw = await small.http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    # A generative model is not a v2 tensor model, and the agent says so.
    v2 = await small.http.post(f"/v2/models/{MODEL}/infer", json={"inputs": []})
    assert v2.status_code == 400 and "/v1/chat/completions" in v2.text
    # Nothing above broke the model.
    ok = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


async def test_a_generative_model_is_not_ready_for_v2_over_grpc_as_over_http(
    control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages
) -> None:
    agent = await make_agent(control_plane, grpc_listen=("127.0.0.1", 0))
    control_plane.hub.set_assignments(SITE, [assignment(packages.small_url, packages.small.sha256)], version=1)
    await wait_state(control_plane, lambda s: s.serving_sha256 == packages.small.sha256)
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        assert (await client.get(f"/v2/models/{MODEL}/ready")).status_code == 400
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        assert not (await pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name=MODEL))).ready


# --- disconnects and overload ---------------------------------------------------------------------


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


async def test_a_body_of_millions_of_keys_is_refused_without_stalling_the_agent(small: Serving) -> None:
    """33 MiB holding 3 million ``metadata`` keys: read on a worker thread, the object was
    still made into a dict in one call holding the GIL (seconds, the event loop stalled
    whichever thread made it); it is refused while it is read, before it is built."""
    keys = b",".join(b'"%x":""' % i for i in range(3_000_000))
    raw = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"metadata":{%s}}' % (MODEL.encode(), keys)
    del keys
    loop = asyncio.get_running_loop()
    posted = asyncio.create_task(small.http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}))
    longest, last = 0.0, loop.time()
    while not posted.done():  # the agent shares this event loop: how long it was held at most
        await asyncio.sleep(0.005)
        now = loop.time()
        longest, last = max(longest, now - last), now
    refused = await posted
    # Held for one call of 1-2 s before; now for no more than a body's bytes take to copy.
    assert longest < 0.5, longest
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
        for _ in range(1500):  # bounded: up to 30-75 s on a loaded machine
            if await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 1 \
                    and await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0:
                break
            await asyncio.sleep(0.05)
        assert await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 1
        assert await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0
        generated = await s.metric("edgeplane_agent_completion_tokens_total", model=MODEL)
        assert 3 <= generated < 4000

        # Not streamed: the client leaves while the whole answer is being generated.
        host, port = s.agent.endpoint_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        payload = json.dumps({**body, "stream": False}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        for _ in range(1500):  # bounded: up to 30-75 s on a loaded machine
            if await s.metric("edgeplane_agent_generation_running", model=MODEL) == 1:
                break
            await asyncio.sleep(0.02)
        writer.close()
        for _ in range(1500):  # bounded: up to 30-75 s on a loaded machine
            if await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 2 \
                    and await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0:
                break
            await asyncio.sleep(0.05)
        assert await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 2
        assert await s.metric("edgeplane_agent_completion_tokens_total", model=MODEL) < generated + 4000


async def test_a_client_that_disconnects_during_a_long_prefill_frees_the_slot_before_the_prompt_is_read(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages) -> None:
    """A long prompt is read in chunks with the cancel flag checked between two: a client that
    leaves while its prompt is read frees the slot (and the requests queued behind it) within
    a chunk, not once the whole prompt is read."""
    prompt = "the edge site serves tokens quickly " * 230
    assert 2500 < token_count(packages.slow, prompt) < 4000
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256, concurrent=1):
        started = asyncio.get_running_loop().time()
        whole = await s.http.post("/v1/completions", json=body)
        read_at_once = asyncio.get_running_loop().time() - started  # nearly all of it reading the prompt
        assert whole.status_code == 200, whole.text

        host, port = s.agent.endpoint_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        payload = json.dumps({**body, "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        for _ in range(1500):  # bounded: up to 30-75 s on a loaded machine
            if await s.metric("edgeplane_agent_generation_running", model=MODEL) == 1:
                break
            await asyncio.sleep(0.01)
        writer.close()
        left = asyncio.get_running_loop().time()
        for _ in range(1500):  # bounded: up to 30-75 s on a loaded machine
            if await s.metric("edgeplane_agent_generation_running", model=MODEL) == 0:
                break
            await asyncio.sleep(0.01)
        freed_after = asyncio.get_running_loop().time() - left
        assert await s.metric("edgeplane_agent_generations_total", model=MODEL, outcome="cancelled") == 1
        assert await s.metric("edgeplane_agent_completion_tokens_total", model=MODEL) == 1  # the first request's only
        # Within a chunk of 256 tokens, a tenth of this prompt: far less than reading it all.
        assert freed_after < read_at_once / 2, (freed_after, read_at_once)


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


# --- packages -------------------------------------------------------------------------------------


async def test_a_mismatching_package_is_refused_and_the_old_version_keeps_serving(
        small: Serving, control_plane: ControlPlane, packages: Packages, artifact_server: ArtifactServer) -> None:
    data = bytearray(packages.slow.package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (artifact_server.root / "corrupt-chat.tar").write_bytes(bytes(data))
    control_plane.hub.set_assignments(SITE, [assignment(artifact_server.url("corrupt-chat.tar"), packages.slow.sha256)], version=2)
    state = await wait_state(control_plane, lambda st: st.phase is model.ModelPhase.FAILED)
    assert "sha256" in state.message and state.serving_sha256 == packages.small.sha256
    r = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    models_dir = small.agent.models_dir
    assert sorted(p.name for p in models_dir.iterdir()) == [packages.small.sha256]  # nothing half-unpacked


async def test_a_package_corrupted_in_the_cache_is_removed_and_fetched_again(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: Packages) -> None:
    async for serving in serve(control_plane, make_agent, packages.small_url, packages.small.sha256):
        first = serving.agent
    await first.stop()
    cached = first.config.data_dir / "cache" / "sha256" / packages.small.sha256
    data = bytearray(cached.read_bytes())  # rotted on disk while the agent was down
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    (first.models_dir / packages.small.sha256 / "genai_config.json").unlink()  # so is its unpacked folder
    agent = await make_agent(control_plane, model_retry=registry.RetryPolicy(initial=0.05, maximum=0.2))  # the saved set
    failed = await wait_state(control_plane, lambda st: st.phase is model.ModelPhase.FAILED)
    assert "sha256" in failed.message, failed.message
    await harness.wait_until(lambda: agent.registry.get(MODEL) is not None, what="the package downloaded again and served")
    assert cached.read_bytes() == packages.small.package.read_bytes()


async def test_a_package_escaping_its_folder_is_refused_before_anything_is_written(
        small: Serving, control_plane: ControlPlane, packages: Packages, artifact_server: ArtifactServer, tmp_path) -> None:
    from tests.agent.genai_packages import evil_package

    for version, kind in enumerate(("dotdot", "symlink", "absolute", "hardlink"), start=2):
        path, sha = evil_package(packages.small.directory, artifact_server.root / f"evil-{kind}.tar", kind)
        control_plane.hub.set_assignments(SITE, [assignment(artifact_server.url(path.name), sha)], version=version)
        state = await wait_state(control_plane, lambda st, sha=sha: st.sha256 == sha and st.phase is model.ModelPhase.FAILED)
        assert "refused" in state.message and state.serving_sha256 == packages.small.sha256, state.message
        assert sorted(p.name for p in small.agent.models_dir.iterdir()) == [packages.small.sha256]
        assert not (small.agent.models_dir.parent / "escaped").exists()
    r = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    assert json.loads(r.model_dump_json())["model"] == MODEL
