"""The built-in onnx-genai Serve application on the session's real Ray cluster: it answers
the same OpenAI routes as an edge agent, streamed and not, to the official ``openai`` SDK."""

from __future__ import annotations

import httpx
import openai

from orchestrator.adapters import ray_serve
from orchestrator.adapters.serve_config import ServeAppSpec, render_application
from orchestrator.testing import genai_model

USER = [{"role": "user", "content": "Where does the model run?"}]


def genai_spec(name: str, built: genai_model.GenAIModel) -> ServeAppSpec:
    return ServeAppSpec(name=name, route_prefix=f"/ep/{name.removeprefix('ep-')}", model_name="assistant", runtime="onnx-genai",
                        num_replicas=1, cpu=0.1, memory_mib=256, artifact_uri=built.package.as_uri(), sha256=built.sha256,
                        args={"max_concurrent_sequences": 2, "max_queued": 4})


def test_the_application_renders_with_the_built_in_import_path(genai_package: genai_model.GenAIModel) -> None:
    app = render_application(genai_spec("ep-x", genai_package))
    assert app["import_path"] == "orchestrator.serving.genai_app:build"
    assert app["args"]["max_concurrent_sequences"] == 2 and app["deployments"][0]["name"] == "GenAIModel"


async def test_genai_app_answers_the_openai_routes_like_the_agent(
    serve_actuator: ray_serve.RayServeActuator, genai_package: genai_model.GenAIModel
) -> None:
    await serve_actuator.apply([genai_spec("ep-chat", genai_package)])
    statuses = await ray_serve.wait_until_running(serve_actuator, ["ep-chat"], timeout_s=120)
    base = statuses["ep-chat"].endpoint_url
    assert base is not None
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        assert [m.id for m in (await client.models.list()).data] == ["assistant"]
        whole = await client.chat.completions.create(model="assistant", messages=USER, max_tokens=8, temperature=0)
        assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
        stream = await client.chat.completions.create(model="assistant", messages=USER, max_tokens=8, temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(content) == 8 and "".join(content) == whole.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        try:
            await client.chat.completions.create(model="other", messages=USER)
            raise AssertionError("an unknown model must be refused")
        except openai.NotFoundError as exc:
            assert exc.body["code"] == "model_not_found"
        async with httpx.AsyncClient() as http:
            bad = await http.post(f"{base}/v1/chat/completions", json={"model": "assistant", "messages": [{"role": "x"}]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0].role"
    finally:
        await client.close()
