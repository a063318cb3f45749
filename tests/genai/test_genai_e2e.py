"""A generative model from manifest to token: apply a ``runtime: onnx-genai`` Model and an
edge deployment to a real control plane; a real agent process is assigned the package,
downloads it from the control plane, verifies, unpacks and loads it, and answers the
official ``openai`` SDK; the gateway's endpoint table says the replica speaks OpenAI."""

from __future__ import annotations

import pathlib

import openai
import pytest_asyncio

from orchestrator.gateway import routing
from orchestrator.testing import genai_model, harness, manifests

SITE = dict(country="FR", lat=48.8566, lon=2.3522)


@pytest_asyncio.fixture
async def fleet(tmp_path: pathlib.Path):
    built = genai_model.build_package(tmp_path / "artifacts", name="chat")
    variant = {"name": "small", **built.manifest_fields(), "resources": {"cpu": 0.25}}
    variant["artifact"] = {"uri": "chat.tar", "sha256": built.sha256}
    body = manifests.bundle(
        manifests.edge_site("edge-paris", **SITE),
        manifests.doc("Model", "assistant", {"variants": [variant]}),
        manifests.deployment("assistant-fr", "assistant", 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )
    async with harness.serving_fleet(tmp_path, body, {"edge-paris": SITE}, resync_s=0.5) as f:
        yield f


async def test_an_applied_generative_model_answers_chat_at_the_edge(fleet: harness.Fleet) -> None:
    cp = fleet.cp
    assert cp is not None
    await harness.wait_until(lambda: cp.table.endpoints("assistant"), 60, what="the assistant's endpoint")
    (endpoint,) = cp.table.endpoints("assistant")
    assert endpoint.api == routing.API_OPENAI and endpoint.site == "edge-paris"
    client = openai.AsyncOpenAI(base_url=f"{endpoint.url}/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "Hello"}],
                                                      max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 6
        assert chunks[-1].usage.completion_tokens == 6
    finally:
        await client.close()
    state = cp.hub.status("edge-paris").models["assistant"]
    assert state.provider == "CPUExecutionProvider" and state.serving
