"""Cascades of generative models through the gateway's OpenAI routes, with the official SDK.

Real edge agents serve the small stage (edge-paris FR, edge-berlin DE), a real local Ray
data centre serves the large one (dc-paris FR), the control plane's gateway is in front.
Both models are built by the test with random weights: these tests check the protocol and
when a request escalates, never the quality of an answer (any quality number from such
models is meaningless).

Stage 1's rule is ``truncated`` (an answer that stops at ``max_tokens`` escalates) with a
``meanLogprobBelow`` no answer can fall under, so that stage 1 is asked for logprobs and
reports a confidence. A request is made unsure with a small ``max_tokens``, and sure with
a ``stop`` string that ends the answer first. The agent kill runs last.
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

from orchestrator.adapters import local_ray
from orchestrator.testing import genai_model, harness, manifests

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

EDGES = {"edge-paris": dict(country="FR", lat=48.8566, lon=2.3522), "edge-berlin": dict(country="DE", lat=52.52, lon=13.405)}
PARIS_FR = {"X-Edgeplane-Location": "48.85,2.35", "X-Edgeplane-Residency": "FR"}
BERLIN_DE = {"X-Edgeplane-Location": "52.52,13.40", "X-Edgeplane-Residency": "DE"}
USER = [{"role": "user", "content": "Where does the model run?"}]
DEPLOYMENT, MODEL = "assist", "assistant"


def variant(name: str, built: genai_model.GenAIModel, watts: float) -> dict[str, Any]:
    v = {"name": name, **built.manifest_fields(), "resources": {"cpu": 0.1, "memoryMiB": 256}, "powerWatts": watts}
    v["artifact"] = {"uri": built.package.name, "sha256": built.sha256}
    return v


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory, ray_cluster: local_ray.LocalRayEndpoints):
    root = tmp_path_factory.mktemp("cascade-openai")
    small = genai_model.build_package(root / "artifacts", name="small")
    large = genai_model.build_package(root / "artifacts", name="large", seed=1, ffn_layers=1, ffn_dim=64)
    dc = manifests.doc("Site", "dc-paris", {"tier": "datacenter", "location": {"country": "FR", "lat": 48.86, "lon": 2.34},
                                            "capacity": {"cpu": 64, "memoryGiB": 256}, "ray": {"address": "local"}})
    body = manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in EDGES.items()), dc,
        manifests.doc("Model", MODEL, {"variants": [variant("small", small, 10), variant("large", large, 250)]}),
        manifests.doc("ModelDeployment", DEPLOYMENT, {
            "model": MODEL, "variant": {"edge": "small", "datacenter": "large"}, "replicas": {"min": 3, "max": 3},
            "placement": {"residency": ["EU"], "spread": {"by": "site", "maxSkew": 1}},
            "cascade": {"stages": [{"variant": "small", "escalate": {"truncated": True, "meanLogprobBelow": -99}},
                                   {"variant": "large"}]}}),
    )

    def ready(cp: Any) -> bool:
        sites = {e.site for e in cp.table.endpoints(MODEL) if e.healthy}
        return sites == {*EDGES, "dc-paris"} and MODEL in cp.table.cascades

    # 20 missed heartbeats before an agent is declared dead: the kill test finds the killed
    # stage-1 replica still in the table, as a gateway does in the first seconds.
    async with harness.serving_fleet(root, body, EDGES, ready=ready, what="both edge replicas and the data-centre replica", timeout=240,
                                     interval=0.2, local_ray_endpoints=ray_cluster, resync_s=1.0, missed_heartbeats=20) as f:
        yield f


@pytest_asyncio.fixture(loop_scope="module")
async def sdk(fleet: harness.Fleet):
    assert fleet.cp is not None
    client = openai.AsyncOpenAI(base_url=f"{fleet.cp.http_url}/openai/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    await client.close()


async def metric(fleet: harness.Fleet, name: str, **labels: str) -> float:
    assert fleet.cp is not None
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{fleet.cp.http_url}/metrics")).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def stop_string(sdk: openai.AsyncOpenAI) -> str:
    """A stop string that ends stage 1's answer in its second half, before ``max_tokens=8``
    (read from stage 1 alone at temperature 0: two characters first seen there)."""
    alone = await sdk.chat.completions.create(model=DEPLOYMENT, messages=USER, max_tokens=6, temperature=0,
                                              extra_headers={**PARIS_FR, "X-Edgeplane-Cascade": "force-first"})
    text = alone.choices[0].message.content or ""
    for i in range(len(text) - 2, len(text) // 2 - 1, -1):
        if text.find(text[i:i + 2]) == i and text[i:i + 2].strip():
            return text[i:i + 2]
    raise AssertionError(f"no stop string in {text!r}")


async def test_an_unsure_answer_escalates_within_the_callers_residency(sdk: openai.AsyncOpenAI, fleet: harness.Fleet) -> None:
    before = await metric(fleet, "edgeplane_cascade_escalations_total", cascade=DEPLOYMENT, stage="small", cause="unsure")
    for name in (DEPLOYMENT, MODEL):  # a cascade is called by its deployment's name or its model's
        raw = await sdk.chat.completions.with_raw_response.create(model=name, messages=USER, max_tokens=4, temperature=0,
                                                                  extra_headers=PARIS_FR)
        h, answer = raw.headers, raw.parse()
        assert h["x-edgeplane-cascade-stage"] == "large" and h["x-edgeplane-site"] == "dc-paris"
        assert h["x-edgeplane-cascade-escalation"] == "escalated"
        assert h["x-edgeplane-cascade-sites"] == "edge-paris,dc-paris"
        assert "max_tokens" in h["x-edgeplane-cascade-reason"]
        meta = answer.model_extra["edgeplane"]
        assert meta["stage"] == "large" and meta["escalated"] is True and meta["sites"] == ["edge-paris", "dc-paris"]
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 4
    after = await metric(fleet, "edgeplane_cascade_escalations_total", cascade=DEPLOYMENT, stage="small", cause="unsure")
    assert after - before == 2
    text = await sdk.completions.with_raw_response.create(model=DEPLOYMENT, prompt="Once", max_tokens=3, temperature=0,
                                                          extra_headers=PARIS_FR)
    assert text.headers["x-edgeplane-cascade-escalation"] == "escalated" and text.parse().choices[0].text
    assert fleet.cp is not None
    async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=10) as http:  # what `edgeplane get cascades` shows
        (view,) = [c for c in (await http.get("/v1/cascades")).json()["items"] if c["name"] == DEPLOYMENT]
    assert view["answered"]["large"] >= 3 and view["escalations"]["unsure"] >= 3 and view["energyPerRequestJ"] > 0


async def test_a_sure_answer_stays_at_the_edge_with_its_confidence(sdk: openai.AsyncOpenAI) -> None:
    stop = await stop_string(sdk)
    raw = await sdk.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=USER, max_tokens=8, temperature=0,
                                                              stop=[stop], extra_headers=PARIS_FR)
    h, answer = raw.headers, raw.parse()
    assert h["x-edgeplane-cascade-stage"] == "small" and h["x-edgeplane-site"] == "edge-paris"
    assert h["x-edgeplane-cascade-escalation"] == "none" and h["x-edgeplane-cascade-sites"] == "edge-paris"
    confidence = float(h["x-edgeplane-cascade-confidence"])
    assert 0 < confidence <= 1
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].logprobs is None  # asked of the stage for the judge, not returned unasked
    assert answer.model_extra["edgeplane"]["confidence"] == pytest.approx(confidence, abs=1e-4)


async def test_no_allowed_stage_2_returns_stage_1_saying_why(sdk: openai.AsyncOpenAI, fleet: harness.Fleet) -> None:
    before = await metric(fleet, "edgeplane_cascade_not_escalated_total", cascade=DEPLOYMENT, stage="small")
    raw = await sdk.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=USER, max_tokens=4, temperature=0,
                                                              extra_headers=BERLIN_DE)
    h, answer = raw.headers, raw.parse()
    assert h["x-edgeplane-cascade-stage"] == "small" and h["x-edgeplane-site"] == "edge-berlin"
    assert h["x-edgeplane-cascade-escalation"] == "not-escalated" and h["x-edgeplane-cascade-sites"] == "edge-berlin"
    assert "max_tokens" in h["x-edgeplane-cascade-reason"] and "DE" in h["x-edgeplane-cascade-reason"]
    meta = answer.model_extra["edgeplane"]
    assert meta["escalated"] is False and meta["escalation"] == "not-escalated" and "max_tokens" in meta["reason"]
    assert await metric(fleet, "edgeplane_cascade_not_escalated_total", cascade=DEPLOYMENT, stage="small") == before + 1


async def test_an_echoed_completion_is_judged_on_its_own_tokens_and_echoes_the_prompt(sdk: openai.AsyncOpenAI) -> None:
    """Stage 1 is asked for logprobs for its judge; with the caller's echo that asks for the
    prompt's logprobs too, which the agent refuses: the stage answers without echo, and the
    gateway puts the prompt back. A caller asking for both is refused, naming echo."""
    prompt = "Where does the model run?"
    plain = await sdk.completions.create(model=DEPLOYMENT, prompt=prompt, max_tokens=4, temperature=0, extra_headers=BERLIN_DE)
    raw = await sdk.completions.with_raw_response.create(model=DEPLOYMENT, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                                         extra_headers=BERLIN_DE)
    answer = raw.parse()
    assert raw.headers["x-edgeplane-cascade-stage"] == "small" and raw.headers["x-edgeplane-site"] == "edge-berlin"
    assert answer.choices[0].text == prompt + plain.choices[0].text and answer.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.completions.create(model=DEPLOYMENT, prompt=prompt, max_tokens=4, echo=True, logprobs=1, extra_headers=BERLIN_DE)
    assert (refused.value.param, refused.value.code) == ("echo", "unsupported_parameter"), refused.value.body


async def test_an_echoed_completion_of_a_prompt_given_as_a_list_of_one_string_is_answered(sdk: openai.AsyncOpenAI) -> None:
    """OpenAI's prompt may be a list of one string, which the agent reads as that string: the
    judge's logprobs must not be asked beside its echo there either (the agent refuses both)."""
    prompt = "Where does the model run?"
    plain = await sdk.completions.create(model=DEPLOYMENT, prompt=prompt, max_tokens=4, temperature=0, extra_headers=BERLIN_DE)
    raw = await sdk.completions.with_raw_response.create(model=DEPLOYMENT, prompt=[prompt], max_tokens=4, temperature=0, echo=True,
                                                         extra_headers=BERLIN_DE)
    answer = raw.parse()
    assert raw.headers["x-edgeplane-cascade-stage"] == "small"
    assert answer.choices[0].text == prompt + plain.choices[0].text and answer.choices[0].logprobs is None


async def test_streams_replay_a_sure_answer_and_relay_an_escalated_one(sdk: openai.AsyncOpenAI) -> None:
    stop = await stop_string(sdk)
    whole = await sdk.chat.completions.create(model=DEPLOYMENT, messages=USER, max_tokens=8, temperature=0, stop=[stop],
                                              extra_headers=PARIS_FR)
    raw = await sdk.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=USER, max_tokens=8, temperature=0,
                                                              stop=[stop], stream=True, stream_options={"include_usage": True},
                                                              extra_headers=PARIS_FR)
    assert raw.headers["x-edgeplane-cascade-stage"] == "small" and raw.headers["x-edgeplane-cascade-escalation"] == "none"
    chunks = [c async for c in raw.parse()]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].model_extra["edgeplane"]["stage"] == "small"

    raw = await sdk.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=USER, max_tokens=6, temperature=0,
                                                              stream=True, extra_headers=PARIS_FR)
    assert raw.headers["x-edgeplane-cascade-stage"] == "large" and raw.headers["x-edgeplane-cascade-escalation"] == "escalated"
    assert raw.headers["x-edgeplane-cascade-sites"] == "edge-paris,dc-paris"
    content = [c.choices[0].delta.content async for c in raw.parse() if c.choices and c.choices[0].delta.content]
    assert len(content) == 6  # stage 2's stream, relayed one chunk per token


async def test_the_caller_may_force_the_last_stage_or_turn_the_cascade_off(sdk: openai.AsyncOpenAI) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=USER, max_tokens=4, temperature=0,
                                                              extra_headers={**PARIS_FR, "X-Edgeplane-Cascade": "force-last"})
    assert raw.headers["x-edgeplane-cascade-stage"] == "large" and raw.headers["x-edgeplane-cascade-sites"] == "dc-paris"
    assert raw.headers["x-edgeplane-cascade-escalation"] == "none"
    raw = await sdk.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=USER, max_tokens=4, temperature=0,
                                                              stream=True, extra_headers={**PARIS_FR, "X-Edgeplane-Cascade": "off"})
    assert raw.headers["x-edgeplane-site"] == "edge-paris" and "x-edgeplane-cascade-stage" not in raw.headers
    assert len([c async for c in raw.parse() if c.choices and c.choices[0].delta.content]) == 4  # truncated, not escalated
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model=DEPLOYMENT, messages=USER, extra_headers={"X-Edgeplane-Cascade": "sometimes"})


async def test_a_forced_stage_with_no_replica_for_the_caller_is_unavailable_not_a_bad_gateway(sdk: openai.AsyncOpenAI) -> None:
    """The large stage runs in FR only: a DE caller forcing it gets 503, as plain routing
    answers a model with no replica for the caller (it was 502, as if a replica had failed)."""
    for mode, stage in (("force-last", "large"), ("force-first", "small")):
        where = BERLIN_DE if mode == "force-last" else {"X-Edgeplane-Residency": "US"}
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk.chat.completions.create(model=DEPLOYMENT, messages=USER, max_tokens=2,
                                              extra_headers={**where, "X-Edgeplane-Cascade": mode})
        assert failed.value.status_code == 503, mode
        error = failed.value.body
        assert isinstance(error, dict) and error["code"] == "stage_unavailable", error
        assert f"{stage}: no replica in the caller's residency" in error["message"], error


async def test_stage_1_killed_under_load_is_answered_by_stage_2(sdk: openai.AsyncOpenAI, fleet: harness.Fleet) -> None:
    stop = await stop_string(sdk)
    before = await metric(fleet, "edgeplane_cascade_escalations_total", cascade=DEPLOYMENT, stage="small", cause="down")

    async def ask() -> Any:
        return await sdk.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=USER, max_tokens=8, temperature=0,
                                                                   stop=[stop], extra_headers=PARIS_FR)

    first = [asyncio.ensure_future(ask()) for _ in range(6)]
    fleet.agents["edge-paris"].kill(signal.SIGKILL)
    await asyncio.to_thread(fleet.agents["edge-paris"].process.wait, 10)
    answers = await asyncio.gather(*first, *(ask() for _ in range(6)))  # no request fails
    for raw in answers:
        assert raw.parse().choices, raw
    late = answers[6:]  # sent after the kill: stage 1 is down, stage 2 answers
    assert all(r.headers["x-edgeplane-cascade-stage"] == "large" for r in late)
    assert all(r.headers["x-edgeplane-cascade-escalation"] == "escalated" and r.headers["x-edgeplane-site"] == "dc-paris"
               for r in late)
    assert await metric(fleet, "edgeplane_cascade_escalations_total", cascade=DEPLOYMENT, stage="small", cause="down") > before
    assert json.loads((await sdk.chat.completions.with_raw_response.create(
        model=DEPLOYMENT, messages=USER, max_tokens=2, extra_headers=PARIS_FR)).http_response.text)["edgeplane"]["stage"] == "large"
