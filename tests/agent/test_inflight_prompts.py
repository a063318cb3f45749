"""A /v1 prompt is charged to the memory budget of requests in flight for what formatting and
tokenizing it takes, before it is tokenized: onnxruntime-genai's tokenizer holds about 30
bytes a token while it works, outside Python's allocator, and a prompt of characters past
U+FFFF is a token a byte in a byte-level vocabulary (measured in ``inflight.PROMPT_BYTE_FACTOR``:
up to 42 x the prompt's UTF-8 bytes, against the 11 x its body was charged for a long one).
A real agent serving the tiny chat package with a small budget, real HTTP on loopback."""

from __future__ import annotations

import json

import httpx

from edge_agent import inflight

from . import genai_serving as serving
from .conftest import SITE, ControlPlane, MakeAgent
from .test_inflight_memory import BUDGET, held


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
