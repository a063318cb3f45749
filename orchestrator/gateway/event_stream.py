"""A replica's server-sent events as the OpenAI relay reads them: whole, timed, and told apart.

The relay (:mod:`orchestrator.gateway.openai_relay`) commits a stream to its caller only
once the answer has begun, and after that must know whether the replica finished it. Both
depend on reading the events right, which is this module's job:

- Events are split at any blank line, whatever the line ends: the SSE standard allows
  CRLF, LF and CR, and servers built on sse-starlette end their events with ``\\r\\n\\r\\n``.
  The events are passed on with LF line ends.
- Until the first token a read waits only until the first-token deadline: a chat stream's
  opening event (an empty ``role`` delta, which an engine sends before its prefill) or a
  keep-alive comment is not a token, and must not stretch the wait to the idle timeout.
- :func:`lead` and :func:`ending` say what a stream began and ended with (nothing yet, a
  token, an error, ``[DONE]``), so that an error before the first token is a failed
  attempt, and a stream that stops without ``[DONE]`` a cut one.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from orchestrator.gateway.upstream import UpstreamError

#: The longest server-sent event taken from a replica (a token's chunk is a few hundred
#: bytes): a replica that never ends one is cut off, not buffered until memory runs out.
MAX_EVENT_BYTES = 1 << 20


class Kind(enum.Enum):
    NOTHING = "nothing"  # no token: a chat's opening (empty ``role`` delta), a comment, a keep-alive
    TOKEN = "token"  # the answer: a token, a finish, a usage chunk, anything else the caller reads
    ERROR = "error"  # an OpenAI error object
    DONE = "done"  # ``data: [DONE]``


class Cut(Exception):
    """The replica's stream broke or went silent (``silent``: it may be merely slow)."""

    def __init__(self, why: str, *, silent: bool = False) -> None:
        super().__init__(why)
        self.silent = silent


class Body(Protocol):
    """A streamed answer's body (``upstream.Stream``): its bytes as they arrive, ``b""`` at its end."""

    async def read(self) -> bytes: ...


class Reader:
    """Whole SSE events of ``resp`` as they arrive (a read's worth at a time, never a partial
    event), ending cleanly at the end of the body; a cut, a stall or an event past
    :data:`MAX_EVENT_BYTES` (ended or not) raises :class:`Cut`. Until :meth:`answering` is called, reads
    wait only until ``first_token_by`` (the event loop's clock); after it, ``idle_timeout``
    between two reads."""

    def __init__(self, resp: Body, first_token_by: float, idle_timeout: float) -> None:
        self.resp = resp
        self.first_token_by: float | None = first_token_by
        self.idle_timeout = idle_timeout

    def answering(self) -> None:
        """The first token is in: from now on only a pause past the idle timeout is a stall."""
        self.first_token_by = None

    async def _read(self) -> bytes:
        due = self.first_token_by
        try:
            if due is not None:
                async with asyncio.timeout_at(due):
                    return await self.resp.read()
            async with asyncio.timeout(self.idle_timeout):
                return await self.resp.read()
        except UpstreamError as exc:
            raise Cut(f"stream cut: {exc}") from None
        except TimeoutError:
            why = "no first token in time" if due is not None else f"no data for {self.idle_timeout:g}s"
            raise Cut(why, silent=True) from None

    async def batches(self) -> AsyncIterator[bytes]:
        tail = b""
        lf_owed = False  # the last read ended in CR: an LF that starts the next is the rest of its CRLF
        while True:
            data = await self._read()
            if not data:
                if tail.strip():
                    raise Cut("stream ended inside an event")
                return
            if lf_owed and data.startswith(b"\n"):
                data = data[1:]
            lf_owed = data.endswith(b"\r")
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            tail += data
            cut = tail.rfind(b"\n\n", max(0, len(tail) - len(data) - 1))  # what came before holds no blank line
            if cut >= 0:
                whole, tail = tail[: cut + 2], tail[cut + 2:]
                # Ended in this read, an event is held to the limit as one unfinished is: the
                # reads before may hold less than the limit, and this one the rest of it.
                if len(whole) > MAX_EVENT_BYTES and max(map(len, whole.split(b"\n\n"))) > MAX_EVENT_BYTES:
                    raise Cut(f"an event past {MAX_EVENT_BYTES} bytes")
                yield whole
            if len(tail) > MAX_EVENT_BYTES:
                raise Cut(f"an event past {MAX_EVENT_BYTES} bytes (no blank line ends it)")


def lead(batch: bytes) -> tuple[Kind, Any] | None:
    """The first event of ``batch`` (whole events, LF line ends) that is more than nothing,
    with its data read as JSON where it is an object (None otherwise); None when there is none."""
    for event in batch.split(b"\n\n"):
        if (k := _kind(event)) is not None and k[0] is not Kind.NOTHING:
            return k
    return None


def ending(*batches: bytes) -> list[Kind]:
    """The kinds of the last two events that carry data in ``batches`` (in order): how a
    stream ended. Only those are read, whatever the batches' length."""
    found: list[Kind] = []
    for batch in reversed(batches):
        for event in reversed(batch.split(b"\n\n")):
            if (k := _kind(event)) is not None:
                found.insert(0, k[0])
                if len(found) == 2:
                    return found
    return found


def _kind(event: bytes) -> tuple[Kind, Any] | None:
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:  # a comment, a retry field, an extra blank line
        return None
    data = b"\n".join(lines)
    if data == b"[DONE]":
        return Kind.DONE, None
    try:
        obj = json.loads(data) if data.startswith(b"{") else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("error"):
        return Kind.ERROR, obj
    return (Kind.NOTHING if _opens(obj) else Kind.TOKEN), obj


def error_message(obj: Any) -> str:
    """The message of an error event's object, as far as it has one."""
    err = obj.get("error") if isinstance(obj, dict) else None
    message = err.get("message") if isinstance(err, dict) else err
    return str(message) if message else "an error event"


def _opens(obj: Any) -> bool:
    """A chat stream's opening chunk: a ``role`` in each delta and nothing else yet (no
    content, reasoning or tool call, no logprobs, no finish)."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or choice.get("finish_reason") or choice.get("logprobs"):
            return False
        if any(value for key, value in delta.items() if key != "role"):
            return False
    return True
