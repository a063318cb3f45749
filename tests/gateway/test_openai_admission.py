"""Token auth and rate limits on the gateway's OpenAI routes, seen by the official SDK: the
same rules as the v2 routes, answered as OpenAI error objects (no agents needed)."""

from __future__ import annotations

import pathlib

import openai
import pytest

from orchestrator.testing import harness

HI = [{"role": "user", "content": "hi"}]


async def test_openai_routes_take_the_gateways_tokens_and_rate_limit(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(gateway_auth="token", gateway_rate=0.01, gateway_burst=2.0)
        secret, _ = cp.store.create_token("api", "read", None, "test", "app")
        base = f"{cp.http_url}/openai/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="sk-unknown", max_retries=0) as stranger, \
                openai.AsyncOpenAI(base_url=base, api_key=secret, max_retries=0) as app:
            with pytest.raises(openai.AuthenticationError) as refused:  # auth on: an unknown key is refused
                await stranger.chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
            assert refused.value.status_code == 401 and refused.value.body["type"] == "authentication_error"  # type: ignore[index]
            with pytest.raises(openai.NotFoundError) as missing:  # past auth: the model is unknown
                await app.chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
            assert missing.value.code == "model_not_found"
            assert (await app.models.list()).data == []
            with pytest.raises(openai.RateLimitError) as limited:  # the token's bucket (burst 2) is spent
                await app.models.list()
            assert int(limited.value.response.headers["retry-after"]) >= 1 and limited.value.code == "rate_limit_exceeded"
    finally:
        await fleet.stop()
