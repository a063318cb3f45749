"""Generative models on an agent, through the official ``openai`` SDK: the protocol, bad
input, and packages that do not verify.

A real agent (in process) joins a real control-plane gRPC server on loopback, is assigned
a ``runtime: onnx-genai`` package served over real HTTP, verifies, unpacks and loads it
with onnxruntime-genai, and answers ``/v1`` — streamed and not — to ``openai.AsyncOpenAI``.
Overload, disconnects and limits: ``test_genai_load``.
"""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest

from edge_agent import registry
from edgeplane_proto.inference.v2 import inference_pb2 as pb
from edgeplane_proto.inference.v2 import inference_pb2_grpc as pb_grpc
from orchestrator.agents import model
from orchestrator.testing import genai_model, harness

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent
from .genai_serving import MODEL, USER, Packages, Serving, assignment, chatml, serve, token_count, wait_state


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


async def test_answers_say_which_version_answered_before_and_after_a_new_version(
        small: Serving, control_plane: ControlPlane, packages: Packages) -> None:
    """OpenAI's ``system_fingerprint`` names the backend that answered: here the served
    package's version (``fp_`` and the v2 ``model_version``), in whole answers and in every chunk."""
    async def fingerprints() -> set[str | None]:
        whole = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
        text = await small.client.completions.create(model=MODEL, prompt="The agent", max_tokens=2, temperature=0)
        stream = await small.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0, stream=True)
        return {whole.system_fingerprint, text.system_fingerprint, *[c.system_fingerprint async for c in stream]}

    assert await fingerprints() == {f"fp_{packages.small.sha256[:12]}"}
    control_plane.hub.set_assignments(SITE, [assignment(packages.slow_url, packages.slow.sha256)], version=2)
    await wait_state(control_plane, lambda st: st.serving_sha256 == packages.slow.sha256)
    assert await fingerprints() == {f"fp_{packages.slow.sha256[:12]}"}


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
    assert not cached.exists()  # unpacked: only its folder is kept
    data = bytearray(packages.small.package.read_bytes())  # a download the agent was stopped before unpacking...
    data[len(data) // 2] ^= 0xFF  # ...that rotted on disk while it was down
    cached.write_bytes(bytes(data))
    (first.models_dir / packages.small.sha256 / "genai_config.json").unlink()  # and its unpacked folder damaged
    agent = await make_agent(control_plane, model_retry=registry.RetryPolicy(initial=0.05, maximum=0.2))  # the saved set
    failed = await wait_state(control_plane, lambda st: st.phase is model.ModelPhase.FAILED)
    assert "sha256" in failed.message, failed.message
    await harness.wait_until(lambda: agent.registry.get(MODEL) is not None, what="the package downloaded again and served")
    assert not cached.exists()  # downloaded whole, unpacked, and removed
    assert (agent.models_dir / packages.small.sha256 / "genai_config.json").is_file()


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


async def test_text_after_bytes_that_make_no_character_is_not_lost(small: Serving) -> None:
    """Sampled hot, a byte-level model writes bytes that make no character (0xC3 then "a"):
    the answer is its tokens' bytes read as UTF-8, each such byte a U+FFFD, and the text
    after it is all there, streamed or not (the library's own stream decoder dropped the
    token after such a byte, and more: " the" became "the")."""
    asked = {"model": MODEL, "messages": USER, "max_tokens": 48, "temperature": 2.0, "seed": 7, "logprobs": True}
    whole = await small.client.chat.completions.create(**asked)
    items = whole.choices[0].logprobs.content
    spoken = b"".join(bytes(i.bytes) for i in items if i.token not in genai_model.SPECIAL_TOKENS).decode("utf-8", "replace")
    assert "\ufffd" in spoken  # the test asks what it means to: bytes that make no character
    assert whole.choices[0].message.content == spoken
    streamed = [c async for c in await small.client.chat.completions.create(**asked, stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == spoken
