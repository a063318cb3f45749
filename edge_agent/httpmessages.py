"""What the agent's HTTP handlers take and give, and how an answer goes on the wire.

A :data:`Handler` (``edge_agent.http``, the generative routes) sees a :class:`Request` and
returns a :class:`Response` or a streamed one (``edge_agent.httpstream``); :func:`encode` and
:func:`encode_stream_head` write an answer's HTTP/1.1 head (and body) as bytes. These are
plain values and pure functions, kept apart from ``edge_agent.httpserver``, whose
connections parse requests, time them out and write these bytes under flow control: a
handler, and a test of one, needs the messages without the connection machinery. An answer
returns its request's ``X-Request-Id`` (:func:`request_id`), whatever wrote it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from edge_agent.httpstream import StreamingResponse
from edgeplane_proto import correlation

if TYPE_CHECKING:
    from edge_agent import inflight


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    # What the request holds of the memory budget of requests in flight (None: it holds
    # nothing): a handler may charge it more, and the server gives it back after the answer.
    hold: inflight.Hold | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Awaitable["Response | StreamingResponse"]]

_REASONS = {s.value: s.phrase for s in HTTPStatus}


def encode(response: Response, keep_alive: bool, *, head_only: bool = False, announce: bool = False,
           request_id: str | None = None) -> bytes:
    """Status line, headers and body; ``head_only`` (a HEAD request) leaves the body out
    but keeps its length, as RFC 9110 asks. ``announce``: say ``keep-alive`` too (the request
    had a Connection header: an HTTP/1.0 client keeps the connection only when told).
    ``request_id``: the request's ``X-Request-Id``, returned (:func:`request_id`)."""
    head = (f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}\r\n"
            f"content-length: {len(response.body)}\r\ncontent-type: {response.content_type}\r\n")
    for name, value in response.headers:
        head += f"{name}: {value}\r\n"
    if request_id is not None:
        head += f"{correlation.HEADER}: {request_id}\r\n"
    if not keep_alive:
        head += "connection: close\r\n"
    elif announce:
        head += "connection: keep-alive\r\n"
    raw = (head + "\r\n").encode("latin-1")
    return raw if head_only else raw + response.body


def encode_stream_head(response: StreamingResponse, keep_alive: bool, request_id: str | None = None) -> bytes:
    reason = _REASONS.get(response.status, "")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        "transfer-encoding: chunked",
        f"content-type: {response.content_type}",
        "cache-control: no-cache",
    ]
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if request_id is not None:
        lines.append(f"{correlation.HEADER}: {request_id}")
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_id(headers: dict[str, str]) -> str | None:
    """The ``X-Request-Id`` of a request with ``headers`` when it is one to return and name
    in a log line (``edgeplane_proto.correlation``: a caller's address or a line break is
    not); None otherwise. The agent makes none of its own: a gateway sends one, and a
    direct caller that wants one sends it."""
    return correlation.request_id(headers.get(correlation.HEADER))
