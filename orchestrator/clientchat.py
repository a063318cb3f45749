"""A chat's answer as the Python client reads it: the :class:`Chat` an application
iterates, and the OpenAI wire format it is read from (server-sent events, refusals, an
answer read whole).

Kept apart from :mod:`orchestrator.client`, which decides where a chat goes (which
replica or gateway, when to move on): this module only reads what one attempt answered,
for both the synchronous and the asynchronous client. An answer it cannot read is a
:class:`Retry` (the next attempt may answer); once text has been delivered the client
makes a failure a :class:`~orchestrator.clienterrors.StreamCut` (:func:`cut`), as the
text cannot be taken back. A stream's lines are split here too, each held to
:data:`MAX_LINE`, as one that never ends would otherwise be kept in memory until it does.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from edgeplane_proto import retry_after as retry_header
from orchestrator.clienterrors import EdgeplaneError, InferenceError, StreamCut, TimedOut

#: The longest line of an event stream the client takes, in bytes (a token's event is
#: a few hundred): the gateway's relay holds a replica's events to the same size
#: (``orchestrator.gateway.event_stream.MAX_EVENT_BYTES``), which is not imported from
#: there as an application's client does not load the gateway.
MAX_LINE = 1 << 20
_LINE_END = re.compile(rb"\r\n|\r|\n")  # the SSE standard's; str.splitlines also splits at U+2028, which JSON text may hold


@dataclass
class Chat:
    """One answer: iterate it for the text deltas; ``site``, ``ttft_s`` (seconds from the
    start of the chat, its first iteration, to the first token: the endpoint list's lookup
    and failed attempts included, as the caller waited through them), ``usage`` and
    ``finish_reason`` (of the attempt that answers) are filled in as it arrives.

    An answer read only in part holds its connection, and the replica goes on generating,
    until it is closed: :meth:`close` (``with``), :meth:`aclose` (``async with``) for an
    :class:`~orchestrator.client.AsyncClient`'s, or when nothing refers to it any more
    (the deltas refer to the chat weakly, so that dropping it closes the stream at once,
    not at the next cycle collection)."""

    _deltas: Any
    site: str = ""
    url: str = ""
    ttft_s: float | None = None
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    attempts: int = 0
    text: str = ""
    request_id: str = ""  # its X-Request-Id, sent to every attempt; on every error it raises too
    _ended: bool = field(default=False, repr=False)  # the stream's [DONE] arrived
    _started: float = field(default=0.0, repr=False)  # time.perf_counter() when the chat began (before the endpoint lookup)
    _deadline: float = field(default=math.inf, repr=False)  # and when its timeout ends

    def __iter__(self) -> Iterator[str]:
        return _Reading(self, self._deltas)

    def __aiter__(self) -> AsyncIterator[str]:
        return _Reading(self, self._deltas)

    def close(self) -> None:
        """Ends the answer where it is: its connection is closed and iterating it yields no
        more; what arrived (``text``, ``site``, ``usage``, ...) stays."""
        if not hasattr(self._deltas, "close"):
            raise TypeError("an AsyncClient's chat is closed with 'await chat.aclose()' or 'async with'")
        self._deltas.close()

    async def aclose(self) -> None:
        """:meth:`close`, for a chat of either client."""
        if hasattr(self._deltas, "aclose"):
            await self._deltas.aclose()
        else:
            self.close()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Chat:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Reading:
    """An iteration of a chat's deltas, which keeps the chat alive while it goes on (a
    ``for`` over ``client.chat(...)`` holds nothing else of it)."""

    def __init__(self, chat: Chat, deltas: Any) -> None:
        self._chat, self._deltas = chat, deltas

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._deltas)
        except EdgeplaneError as exc:  # whichever attempt raised it: the chat's one id
            exc.request_id = self._chat.request_id
            raise

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._deltas.__anext__()
        except EdgeplaneError as exc:
            exc.request_id = self._chat.request_id
            raise


@dataclass(frozen=True)
class _Event:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    done: bool = False


def read_json(data: bytes | str) -> Any:
    """A JSON value from a server; ``ValueError`` for anything else, a value nested too deep
    for the parser included (``json`` raises ``RecursionError`` for it, which no caller of
    a client expects)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deep to read") from None


def parse_event(line: str) -> _Event | None:
    """One SSE line of a chat stream; None for lines that carry nothing (comments, blanks)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _Event(done=True)
    try:
        obj = read_json(data)
    except ValueError:
        return _Event(error=f"an event that is not JSON: {data[:100]!r}")
    if not isinstance(obj, dict):
        return _Event(error=f"an event that is not a JSON object: {data[:100]!r}")
    if "error" in obj:
        err = obj["error"]
        return _Event(error=str(err.get("message", err) if isinstance(err, dict) else err))
    choices = obj.get("choices")
    # the first choice only: an engine that sends several interleaves their events
    choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), {}) if isinstance(choices, list) else {}
    delta = choice.get("delta") or choice.get("message") or {}
    text = delta.get("content") if isinstance(delta, dict) else None
    usage = obj.get("usage")
    finish = choice.get("finish_reason")
    return _Event(text if isinstance(text, str) else "", finish if isinstance(finish, str) else None,
                  usage if isinstance(usage, dict) else None)


def check_one_choice(params: Mapping[str, Any]) -> None:
    """A chat yields one answer: ``n`` other than 1 would have the engine generate answers
    that no one reads (edgeplane's replicas refuse it)."""
    n = params.get("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        raise ValueError(f"n={n!r}: a chat yields one answer; ask again for another")


def cut(chat: Chat, why: object) -> StreamCut:
    """An answer that failed after part of its text was delivered (named by its site, or
    the URL that answered when no site was given)."""
    return StreamCut(f"the answer from {chat.site or chat.url or 'the replica'} was cut after "
                     f"{len(chat.text)} characters: {why}")


def read_refusal(resp: httpx.Response) -> InferenceError:
    """A refusal as the client raises it, from a replica or a gateway, for inference or a
    chat: its message (a v2 error's string, an OpenAI error's ``message`` and ``code``), the
    ``reason`` of one in the control API's shape, and how long its ``Retry-After`` asks to wait."""
    code = reason = None
    try:
        doc = read_json(resp.content)
        err = doc.get("error", resp.text)
        message = err.get("message", err) if isinstance(err, dict) else err
        code = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None
        reason = doc.get("reason") if isinstance(doc.get("reason"), str) else None
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        message = resp.text or resp.reason_phrase
    return InferenceError(resp.status_code, str(message)[:500], code, retry_after(resp), reason)


def retry_after(resp: httpx.Response) -> float | None:
    """The seconds a refusal's ``Retry-After`` asks to wait (given in seconds or as an HTTP
    date); None without one that can be read."""
    return retry_header.seconds(resp.headers.get("retry-after"))


class Retry(Exception):
    """This attempt failed before its first token: the next one may answer."""


class _Lines:
    """An event stream's lines as its bytes arrive; ``Retry`` for a line past :data:`MAX_LINE`,
    whether or not it has ended: one read may hold several MiB (a gzip stream's, decompressed).
    Lines are split as bytes, then decoded: no byte of a UTF-8 character is CR or LF."""

    def __init__(self) -> None:
        self._partial = bytearray()  # the line begun
        self._after_cr = False  # the last read ended with CR: an LF first in the next is the same line end

    def feed(self, data: bytes, final: bool = False) -> list[str]:
        if data:
            if self._after_cr and data.startswith(b"\n"):
                data = data[1:]
            self._after_cr = data.endswith(b"\r")
        *ended, rest = _LINE_END.split(data)
        if ended:
            ended[0] = bytes(self._partial) + ended[0]
            self._partial = bytearray()
        self._partial += rest
        if len(self._partial) > MAX_LINE or any(len(line) > MAX_LINE for line in ended):
            raise Retry(f"an event line past {MAX_LINE} bytes")
        if final and self._partial:
            ended.append(bytes(self._partial))  # a last line with no line break, as it was
        return [line.decode("utf-8", "replace") for line in ended]


def lines_of(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines of an event stream read in ``chunks`` (a response's bytes)."""
    lines = _Lines()
    for chunk in chunks:
        yield from lines.feed(chunk)
    yield from lines.feed(b"", final=True)


async def alines_of(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """:func:`lines_of` for an asynchronous response."""
    lines = _Lines()
    async for chunk in chunks:
        for line in lines.feed(chunk):
            yield line
    for line in lines.feed(b"", final=True):
        yield line


def line_text(chat: Chat, site: str | None, line: str, seconds: float) -> str | None:
    """The text of one line of ``chat``'s answer from ``site``; raises ``Retry`` before the
    first token, ``StreamCut`` after, and ``TimedOut`` when the chat's timeout (``seconds``)
    has passed with no text yet: a keep-alive comment or an empty ``role`` delta is no
    answer, though each restarts the read timeout of the transport, so a stuck engine
    behind a server that sends them would otherwise be waited on for ever."""
    event = parse_event(line)
    if event is not None and event.done:
        chat._ended = True
        return None
    if event is None:
        _check_begun(chat, seconds)
        return None
    if event.error is not None:
        if not chat.text:
            raise Retry(event.error)
        raise cut(chat, event.error)
    if event.finish_reason:
        chat.finish_reason = event.finish_reason
    if event.usage:
        chat.usage = event.usage
    if event.text and chat.ttft_s is None:
        chat.ttft_s = time.perf_counter() - chat._started
        chat.site = site or chat.site
    chat.text += event.text
    _check_begun(chat, seconds)
    return event.text or None


def _check_begun(chat: Chat, seconds: float) -> None:
    if not chat.text and time.perf_counter() >= chat._deadline:
        raise TimedOut(seconds, chat.attempts)


def check_ended(chat: Chat) -> None:
    """A stream ends with ``data: [DONE]`` (every edgeplane replica and gateway, and the
    OpenAI API, send it); one that stops before it was cut (a proxy closed it), or was no
    event stream at all. Raises ``Retry``; the caller makes it a cut once text arrived."""
    if not chat._ended:
        raise Retry("the event stream ended before its [DONE]" if chat.text else "the answer is not an event stream ending in [DONE]")


def read_whole(chat: Chat, resp: httpx.Response) -> str:
    """The text of a whole (not streamed) answer; ``Retry`` when the body is not one."""
    try:
        obj = read_json(resp.content)
        choice = obj["choices"][0]
        text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError(type(text).__name__)
    except (ValueError, LookupError, TypeError, AttributeError):
        raise Retry(f"HTTP {resp.status_code} with no chat completion ({resp.headers.get('content-type', 'no content type')})") from None
    chat.ttft_s = time.perf_counter() - chat._started
    chat.text = text
    finish, usage = choice.get("finish_reason"), obj.get("usage")
    chat.finish_reason, chat.usage = finish if isinstance(finish, str) else None, usage if isinstance(usage, dict) else None
    return chat.text
