"""The gateway's OpenAI-compatible routes, through the official ``openai`` SDK.

One real control plane (its gateway under ``/openai/v1``) and two real agent processes
(Paris, Berlin) serving generative models the tests build: ``chat`` (tiny, on both sites,
EU residency) and ``slow`` (longer per token, Paris only, one sequence at a time and no
queue, so that a second caller is refused with 429). The agent kill runs last.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import client as client_mod
from orchestrator.cli import chat as chat_cli
from orchestrator.cli import main as cli
from orchestrator.gateway import routing
from orchestrator.gatewayd import server as gatewayd
from orchestrator.testing import genai_model, harness, manifests

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITES = {
    "edge-paris": dict(country="FR", region="fr", lat=48.8566, lon=2.3522),
    "edge-berlin": dict(country="DE", region="de", lat=52.52, lon=13.405),
}
PARIS = {"X-Edgeplane-Location": "48.85,2.35"}
BERLIN = {"X-Edgeplane-Location": "52.52,13.40"}
USER = [{"role": "user", "content": "Where does the model run?"}]


def variant(built: genai_model.GenAIModel, uri: str, **generative: int) -> dict:
    v = {"name": "small", **built.manifest_fields(), "resources": {"cpu": 0.25}}
    v["artifact"] = {"uri": uri, "sha256": built.sha256}
    v["generative"].update(generative)
    return v


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gw-openai")
    chat = genai_model.build_package(root / "artifacts", name="chat")
    slow = genai_model.build_package(root / "artifacts", name="slow", context_length=4096, ffn_layers=4, ffn_repeat=32,
                                     embed_dim=256, ffn_dim=1024, seed=1)
    body = manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in SITES.items()),
        manifests.doc("Model", "chat", {"variants": [variant(chat, "chat.tar")]}),
        manifests.doc("Model", "slow", {"variants": [variant(slow, "slow.tar", maxConcurrentSequences=1, maxQueued=0)]}),
        manifests.deployment("chat-eu", "chat", 2, manifests.spread_by_site(residency=["EU"], tiers=["edge"])),
        manifests.deployment("slow-fr", "slow", 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )

    def ready(cp: Any) -> bool:
        return len(cp.table.endpoints("chat")) == 2 and len(cp.table.endpoints("slow")) == 1

    # Agents are declared dead only after 20 missed heartbeats: the kill test finds the
    # killed replica still in the table, as a gateway does in the first seconds.
    async with harness.serving_fleet(root, body, SITES, ready=ready, what="chat on two sites and slow in Paris", timeout=90,
                                     missed_heartbeats=20) as f:
        yield f


@pytest_asyncio.fixture(loop_scope="module")
async def sdk(fleet: harness.Fleet):
    assert fleet.cp is not None
    # Gateway auth is off: the key is unknown to it and must be ignored, not refused.
    client = openai.AsyncOpenAI(base_url=f"{fleet.cp.http_url}/openai/v1", api_key="sk-unknown-to-edgeplane", max_retries=0, timeout=60)
    yield client
    await client.close()


def endpoint(fleet: harness.Fleet, model: str, site: str) -> routing.Endpoint:
    assert fleet.cp is not None
    return next(e for e in fleet.cp.table.endpoints(model) if e.site == site)


async def metric(url: str, name: str, **labels: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{url}/metrics")).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_models_lists_what_the_caller_may_reach(sdk: openai.AsyncOpenAI, fleet: harness.Fleet) -> None:
    assert endpoint(fleet, "chat", "edge-paris").api == routing.API_OPENAI
    assert sorted(m.id for m in (await sdk.models.list()).data) == ["chat", "slow"]
    german = await sdk.models.list(extra_headers={"X-Edgeplane-Residency": "DE"})
    assert [m.id for m in german.data] == ["chat"]  # slow runs only in France
    assert (await sdk.models.retrieve("chat")).id == "chat"
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("nope")


async def test_stream_relays_token_by_token_with_usage_from_the_nearest_site(sdk: openai.AsyncOpenAI) -> None:
    whole = await sdk.chat.completions.create(model="chat", messages=USER, max_tokens=10, temperature=0, extra_headers=BERLIN)
    raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=10, temperature=0, stream=True,
                                                              stream_options={"include_usage": True}, extra_headers=BERLIN)
    assert raw.headers["x-edgeplane-site"] == "edge-berlin" and raw.headers["x-edgeplane-tier"] == "edge"
    chunks = [c async for c in raw.parse()]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 10  # one chunk per token, as the replica sent them
    assert "".join(content) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10 == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0
    near_paris = await sdk.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=2, extra_headers=PARIS)
    assert near_paris.headers["x-edgeplane-site"] == "edge-paris"


async def test_the_sdks_own_v1_layout_reaches_the_completions(fleet: harness.Fleet) -> None:
    assert fleet.cp is not None
    sdk = openai.AsyncOpenAI(base_url=f"{fleet.cp.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        chat = await sdk.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=3, temperature=0,
                                                                   extra_headers=BERLIN)
        assert chat.headers["x-edgeplane-site"] == "edge-berlin" and chat.parse().usage.completion_tokens == 3
        text = await sdk.completions.create(model="chat", prompt="The agent", max_tokens=3, temperature=0)
        assert text.usage is not None and text.usage.completion_tokens == 3
    finally:
        await sdk.close()
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:  # GET /v1/models stays the control API's Model list
        assert (await http.get("/v1/models")).json()["kind"] == "Model"


async def test_residency_holds_for_chat(sdk: openai.AsyncOpenAI) -> None:
    # A caller in Paris who must stay in Germany is answered from Berlin, never Paris.
    raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=2,
                                                              extra_headers={**PARIS, "X-Edgeplane-Residency": "DE"})
    assert raw.headers["x-edgeplane-site"] == "edge-berlin"
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk.chat.completions.create(model="slow", messages=USER, max_tokens=2, extra_headers={"X-Edgeplane-Residency": "DE"})
    assert refused.value.status_code == 503 and "residency" in refused.value.message


async def test_a_scoped_tokens_models_and_residency_hold_through_the_sdk(fleet: harness.Fleet) -> None:
    """At a gateway with --gateway-auth token, a token for chat in DE lists chat alone, is
    answered from Berlin for a caller in Paris that names no residency, and is refused slow;
    a token for slow alone lists slow alone, though chat is within its reach too."""
    assert fleet.cp is not None
    secret, _ = fleet.cp.store.create_token("api", "read", None, "test", "tenant de", models=["chat"], residency=["DE"])
    slow_only, _ = fleet.cp.store.create_token("api", "read", None, "test", "tenant slow", models=["slow"])
    gw = await gatewayd.StandaloneGateway(gatewayd.GatewayConfig(control_planes=(fleet.cp.http_url,), port=0, gateway_auth="token")).start()
    try:
        assert await gw.follower.wait_snapshot(0, 60)
        async with openai.AsyncOpenAI(base_url=f"{gw.http_url}/openai/v1", api_key=secret, max_retries=0, timeout=60) as tenant:
            listed = [m.id for m in (await tenant.models.list()).data]
            raw = await tenant.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=2, extra_headers=PARIS)
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await tenant.chat.completions.create(model="slow", messages=USER, max_tokens=2)  # type: ignore[arg-type]
        async with openai.AsyncOpenAI(base_url=f"{gw.http_url}/openai/v1", api_key=slow_only, max_retries=0, timeout=60) as other:
            assert [m.id for m in (await other.models.list()).data] == ["slow"]
    finally:
        await gw.stop()
    assert listed == ["chat"]
    assert raw.headers["x-edgeplane-site"] == "edge-berlin"
    assert refused.value.code == "model_not_allowed"


async def test_stop_and_max_tokens_are_honoured(sdk: openai.AsyncOpenAI) -> None:
    free = (await sdk.completions.create(model="chat", prompt="The agent", max_tokens=30, temperature=0)).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    cut = free[:free.index(stop)]
    stopped = await sdk.completions.create(model="chat", prompt="The agent", max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    streamed = [c async for c in await sdk.completions.create(model="chat", prompt="The agent", max_tokens=30, temperature=0,
                                                              stop=stop, stream=True)]
    assert "".join(c.choices[0].text for c in streamed) == cut
    short = await sdk.chat.completions.create(model="chat", messages=USER, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


async def test_a_caller_that_leaves_stops_generation_upstream(sdk: openai.AsyncOpenAI, fleet: harness.Fleet) -> None:
    agent = endpoint(fleet, "slow", "edge-paris").url
    cancelled = await metric(agent, "edgeplane_agent_generations_total", model="slow", outcome="cancelled")
    before = await metric(agent, "edgeplane_agent_completion_tokens_total", model="slow")
    stream = await sdk.chat.completions.create(model="slow", messages=USER, max_tokens=3000, stream=True)
    seen = 0
    async for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    await stream.close()
    for _ in range(200):
        if await metric(agent, "edgeplane_agent_generations_total", model="slow", outcome="cancelled") > cancelled:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the agent never cancelled the generation its caller left")
    assert await metric(agent, "edgeplane_agent_completion_tokens_total", model="slow") - before < 3000


async def test_overload_passes_the_replicas_429_through(sdk: openai.AsyncOpenAI) -> None:
    busy = await sdk.chat.completions.create(model="slow", messages=USER, max_tokens=3000, stream=True)
    try:
        async for chunk in busy:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the only sequence slot is taken
        with pytest.raises(openai.RateLimitError) as refused:
            await sdk.chat.completions.create(model="slow", messages=USER, max_tokens=2)
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    finally:
        await busy.close()


async def test_bad_inputs_get_openai_error_objects(sdk: openai.AsyncOpenAI, fleet: harness.Fleet) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.chat.completions.create(model="nope", messages=USER)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    with pytest.raises(openai.BadRequestError) as role:
        await sdk.chat.completions.create(model="chat", messages=[{"role": "wizard", "content": "hi"}])  # type: ignore[list-item]
    assert role.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as typed:
        await sdk.chat.completions.create(model="chat", messages=USER, max_tokens="many")  # type: ignore[arg-type]
    assert typed.value.param == "max_tokens"
    assert fleet.cp is not None
    async with httpx.AsyncClient(base_url=f"{fleet.cp.http_url}/openai/v1") as http:
        for body, param in ((b"{not json", None), (b"[1]", None), (b'{"messages": []}', "model"),
                            (b'{"model": "chat", "stream": "yes", "messages": []}', "stream")):
            resp = await http.post("/chat/completions", content=body, headers={"content-type": "application/json"})
            error = resp.json()["error"]
            assert resp.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param, resp.text


async def test_client_chat_streams_deltas_from_the_nearest_replica(fleet: harness.Fleet) -> None:
    assert fleet.cp is not None
    async with client_mod.AsyncClient(fleet.cp.http_url, location=(52.52, 13.40)) as c:
        answer = c.chat("chat", USER, max_tokens=6, temperature=0)
        deltas = [d async for d in answer]
        assert len(deltas) == 6 and answer.text == "".join(deltas)
        assert answer.site == "edge-berlin" and answer.url == endpoint(fleet, "chat", "edge-berlin").url  # direct, no gateway hop
        assert answer.ttft_s is not None and answer.usage["completion_tokens"] == 6 and answer.finish_reason == "length"
        whole = c.chat("chat", USER, max_tokens=6, temperature=0, stream=False)
        assert [d async for d in whole] == [answer.text] and whole.usage["completion_tokens"] == 6
        with pytest.raises(client_mod.NoEndpoint):
            [d async for d in c.chat("nope", USER)]
        with pytest.raises(client_mod.InferenceError) as bad:
            [d async for d in c.chat("chat", USER, max_tokens=-1)]
        assert bad.value.status == 400 and "max_tokens" in str(bad.value)


async def test_cli_chat_streams_and_prints_json(fleet: harness.Fleet, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert fleet.cp is not None
    server = fleet.cp.http_url
    # The sync client would block the control plane's own loop: run the CLI in a thread.
    ask = ["chat", "chat", "Hello", "--max-tokens", "5", "--temperature", "0", "--location", "48.85,2.35", "--server", server]
    code = await asyncio.to_thread(cli.main, ask)
    out = capsys.readouterr()
    assert code == 0 and "edge-paris" in out.err and "first token" in out.err and " 5 tokens " in out.err
    code = await asyncio.to_thread(cli.main, [*ask, "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["usage"]["completion_tokens"] == 5 and doc["servedBy"] == "edge-paris"
    assert out.out == doc["content"] + "\n"  # greedy: the streamed text is the whole answer, then a newline
    # without --max-tokens the command stops at its own default (the API would go on to the context)
    monkeypatch.setattr(chat_cli, "DEFAULT_MAX_TOKENS", 3)
    code = await asyncio.to_thread(cli.main, ["chat", "chat", "Hello", "--temperature", "0", "--location", "48.85,2.35",
                                              "--server", server, "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["usage"]["completion_tokens"] == 3 and doc["finishReason"] == "length"
    # a default past the model's context (256 tokens here) leaves the context as the limit; a limit asked for is refused
    monkeypatch.setattr(chat_cli, "DEFAULT_MAX_TOKENS", 100_000)
    code = await asyncio.to_thread(cli.main, ask[:3] + ask[7:] + ["-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and 0 < doc["usage"]["completion_tokens"] and doc["usage"]["total_tokens"] <= 256
    code = await asyncio.to_thread(cli.main, [*ask[:3], "--max-tokens", "100000", *ask[7:]])
    err = capsys.readouterr().err
    assert code == 1 and "maximum context length is 256 tokens" in err and "Traceback" not in err
    code = await asyncio.to_thread(cli.main, ["chat", "nope", "Hello", "--server", server])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def test_a_killed_replica_ends_a_started_stream_and_is_retried_before_the_first_token(sdk: openai.AsyncOpenAI,
                                                                                          fleet: harness.Fleet) -> None:
    assert fleet.cp is not None
    paris = endpoint(fleet, "chat", "edge-paris")
    app = client_mod.AsyncClient(fleet.cp.http_url, location=(48.85, 2.35))
    assert (await app.endpoints("chat"))[0]["site"] == "edge-paris"  # cached for its TTL, as applications do
    started = await sdk.chat.completions.create(model="slow", messages=USER, max_tokens=3000, stream=True)
    async for chunk in started:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # tokens reached the caller: from here no retry, the stream ends with an error event
    fleet.agents["edge-paris"].kill(signal.SIGKILL)
    fleet.agents["edge-paris"].process.wait(10)
    with pytest.raises(openai.APIError) as cut:
        async for _ in started:
            pass
    assert "edge-paris" in cut.value.message
    assert await metric(fleet.cp.http_url, "edgeplane_gateway_streams_cut_total", model="slow", site="edge-paris") == 1
    assert await metric(fleet.cp.http_url, "edgeplane_gateway_failovers_total", model="slow") == 0  # it stayed where it was
    assert paris in fleet.cp.table.endpoints("chat")  # still listed: no heartbeat has been missed yet
    raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=USER, max_tokens=4, temperature=0, stream=True,
                                                              extra_headers=PARIS)
    assert raw.headers["x-edgeplane-site"] == "edge-berlin"  # Paris refused the connection: retried, nobody saw it
    content = [c.choices[0].delta.content async for c in raw.parse() if c.choices and c.choices[0].delta.content]
    assert len(content) == 4
    # The client's cached list still names Paris first: it is skipped, Berlin answers.
    async with app:
        answer = app.chat("chat", USER, max_tokens=4, temperature=0)
        assert len([d async for d in answer]) == 4 and answer.site == "edge-berlin" and answer.attempts == 2
