"""OpenAI-route fuzzing against a real agent serving a tiny generative model and the gateway
in front of it: valid requests with one field changed to anything, random JSON and random
bytes. Every answer is a well-formed completion, a stream that ends with ``[DONE]``, or an
OpenAI error object with a one-line message; never a 5xx, and the agent keeps serving."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent import openai_api

from .conftest import FUZZ, TRIED, FleetThread, text
from .test_infer_fuzz import json_values

MODEL = "chat"
ROUTES = {"agent": "/v1", "gateway": "/openai/v1"}

messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.one_of(st.sampled_from(["Hi", "Where does it run?", "é\n", ""]),
                                                                st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                                "text": text(max_size=6)}),
                                                                         min_size=1, max_size=2))}),
                    min_size=1, max_size=3)
# what a caller may send, each with values the route takes
COMMON = {"max_tokens": st.integers(1, 4), "temperature": st.sampled_from([0, 0.7, 2]), "top_p": st.sampled_from([0.1, 1]),
          "stream": st.booleans(), "seed": st.integers(-(2**63), 2**64 - 1),
          "stop": st.one_of(text(max_size=3), st.lists(text(max_size=3), max_size=4)),
          "user": text(max_size=4), "n": st.just(1), "presence_penalty": st.just(0), "frequency_penalty": st.just(0)}
CHAT = {**COMMON, "logprobs": st.booleans(), "max_completion_tokens": st.integers(1, 4)}
COMPLETION = {**COMMON, "logprobs": st.integers(0, 5), "echo": st.booleans()}
ANY_KEY = st.sampled_from([*sorted(openai_api.CHAT_PARAMETERS | openai_api.COMPLETION_PARAMETERS), "stream_options", "x", ""])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(chat route?, body): a fifth random bytes or JSON, two fifths valid, the rest valid
    with one field changed to anything or cut short."""
    chat = draw(st.booleans())
    kind = draw(st.sampled_from(["bytes", "json", "valid", "valid", "valid", "valid", "changed", "changed", "changed", "cut"]))
    if kind == "bytes":
        return chat, draw(st.binary(max_size=120))
    if kind == "json":
        return chat, json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = {"model": MODEL if draw(st.integers(0, 4)) else draw(st.sampled_from(["intent", "nope", ""])), "max_tokens": 2}
    if chat:
        body["messages"] = draw(messages)
    else:
        body["prompt"] = draw(st.sampled_from(["Once", "The agent", ["Once"]]))
    body.update(draw(st.fixed_dictionaries({}, optional=CHAT if chat else COMPLETION)))
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if kind == "changed":
        body[draw(ANY_KEY)] = draw(json_values)
    raw = json.dumps(body).encode()
    if kind == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    return chat, raw


def _well_formed(resp: httpx.Response) -> str | None:
    """What is wrong with an answer, or None."""
    if resp.status_code >= 500:
        return "a 5xx"
    if resp.status_code == 200:
        if resp.headers["content-type"].startswith("text/event-stream"):
            return None if resp.text.rstrip().endswith("data: [DONE]") else "a stream without [DONE]"
        return None if isinstance(resp.json().get("choices"), list) else "an answer without choices"
    try:
        error = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "a refusal that is not an OpenAI error object"
    if set(error) != {"message", "type", "param", "code"} or not isinstance(error["message"], str) or "\n" in error["message"]:
        return "a malformed error object"
    return None


@pytest.mark.parametrize("where", ["agent", "gateway"])
def test_openai_bodies_never_5xx(fuzz_fleet: FleetThread, where: str) -> None:
    cp, agent = fuzz_fleet.fleet.cp, fuzz_fleet.fleet.agents["edge-fuzz"]
    assert cp is not None
    base = (agent.url if where == "agent" else cp.http_url) + ROUTES[where]
    codes: dict[int, int] = {}
    first: list[str] = []  # Hypothesis reports the shrunk case; the first one says more
    with httpx.Client(base_url=base, timeout=30) as http:

        def still_serves() -> None:
            ok = http.post("/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text

        still_serves()

        @FUZZ
        @given(requests())
        def fuzz(request: tuple[bool, bytes]) -> None:
            TRIED[f"OpenAI bodies -> {where}"] += 1
            chat, raw = request
            resp = http.post("/chat/completions" if chat else "/completions", content=raw, headers={"content-type": "application/json"})
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            wrong = _well_formed(resp)
            if wrong and not first:
                first.append(f"{wrong}: {resp.status_code} {resp.text[:300]!r} for {raw[:300]!r}")
            assert wrong is None, (wrong, resp.status_code, resp.text[:300], raw[:300])

        try:
            fuzz()
        except AssertionError as exc:
            raise AssertionError(f"first: {first[0] if first else '-'}") from exc
        assert agent.process.poll() is None, "the agent died"
        still_serves()
    assert codes.get(200, 0) > 0, codes  # the valid requests got through
    print(f"{where}: status codes {sorted(codes.items())}")
