"""A judged generative answer replayed to a streaming caller: the chunks are what the
official SDK's types accept, and they add up to the answer."""

from __future__ import annotations

import json

from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from orchestrator.gateway import openai_cascade

META = {"stage": "small", "escalated": False}


def events(raw: list[bytes]) -> list[dict]:
    assert raw[-1] == b"data: [DONE]\n\n"
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in raw)
    return [json.loads(e[len(b"data: "):]) for e in raw[:-1]]


def test_a_chat_answer_replays_as_chunks_with_usage_and_metadata_last() -> None:
    answer = {"id": "c1", "object": "chat.completion", "created": 7, "model": "m", "edgeplane": META,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop",
                           "logprobs": None}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    chunks = [ChatCompletionChunk.model_validate(e) for e in events(openai_cascade.replay(answer, chat=True, usage=True))]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5
    assert chunks[-1].model_extra["edgeplane"] == META
    assert all(c.id == "c1" and c.model == "m" for c in chunks)


def test_a_text_completion_replays_without_usage_unless_asked() -> None:
    answer = {"id": "t1", "object": "text_completion", "created": 7, "model": "m",
              "choices": [{"index": 0, "text": "abc", "finish_reason": "length", "logprobs": None}]}
    chunks = [Completion.model_validate(e) for e in events(openai_cascade.replay(answer, chat=False, usage=False))]
    assert "".join(c.choices[0].text for c in chunks) == "abc"
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
