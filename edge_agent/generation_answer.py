"""The answer of one generation on the agent's OpenAI-compatible routes
(:mod:`edge_agent.generation`): the whole chat or completion object, or its stream of
server-sent events, made from the batches of events its sequence hands over.

Why apart: how the events become OpenAI's bytes is one idea; admitting, running and
handing a sequence's events over (``generation``) is another.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from edge_agent import openai_api
from edge_agent.httpmessages import Response
from edge_agent.runtime import genai


@dataclass(frozen=True)
class Failed:
    """A generation that raised: the event that ends its sequence."""

    message: str


class Closing:
    """An async iterator over ``inner`` whose ``aclose`` also runs ``on_close``, even when
    it is closed before its first item (a client gone before the stream began)."""

    def __init__(self, inner: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._on_close = on_close

    def __aiter__(self) -> Closing:
        return self

    async def __anext__(self) -> bytes:
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()  # type: ignore[attr-defined]
        finally:
            self._on_close()


async def whole(shaper: openai_api.Shaper, batches: AsyncIterator[list[Any]]) -> Response:
    """The chat or completion object of a generation not streamed, once it has finished."""
    parts: list[str] = []
    tokens: list[genai.TokenEvent] = []
    async for batch in batches:
        for ev in batch:
            if isinstance(ev, genai.TokenEvent):
                parts.append(ev.text)
                tokens.append(ev)
            elif isinstance(ev, genai.Finished):
                parts.append(ev.text)
                return json_response(shaper.whole("".join(parts), tokens, ev.reason, ev.prompt_tokens, ev.completion_tokens))
            else:
                raise openai_api.ApiError(500, ev.message, type_="server_error", code="generation_failed")
    raise openai_api.ApiError(500, "generation ended without a result", type_="server_error")


async def sse(shaper: openai_api.Shaper, batches: AsyncIterator[list[Any]]) -> AsyncIterator[bytes]:
    """The stream's bytes: one piece per batch of events (see :mod:`edge_agent.generation`'s docstring)."""
    sse = openai_api.sse
    request = shaper.request
    offset = len(request.prompt) if request.echo else 0
    if request.chat:
        yield sse(shaper.chunk("", first=True))
    elif request.echo:
        yield sse(shaper.chunk(request.prompt))
    async for batch in batches:
        out: list[bytes] = []
        for ev in batch:
            if isinstance(ev, genai.TokenEvent):
                if request.options.logprobs:
                    out.append(sse(shaper.chunk(ev.text, (ev,), offset=offset)))
                    offset += openai_api.characters(ev.token)
                elif ev.text:
                    out.append(shaper.token_event(ev.text))
            elif isinstance(ev, genai.Finished):
                if ev.text:
                    out.append(sse(shaper.chunk(ev.text)))
                out.append(sse(shaper.chunk("", reason=ev.reason)))
                if request.include_usage:
                    out.append(sse(shaper.usage_chunk(ev.prompt_tokens, ev.completion_tokens)))
                yield b"".join(out) + openai_api.SSE_DONE
                return
            else:
                # The status line is gone: the error travels as an event, then the stream ends.
                out.append(openai_api.sse_error(openai_api.ApiError(500, ev.message, type_="server_error", code="generation_failed")))
                yield b"".join(out) + openai_api.SSE_DONE
                return
        if out:
            yield b"".join(out)


def json_response(obj: object, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode())
