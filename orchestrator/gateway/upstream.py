"""Keep-alive HTTP/1.1 connections from the gateway to replicas: asyncio + httptools.

The gateway makes one kind of request, a POST or GET with a small set of headers, to a
few hundred replicas, on its hottest path: buffered (``request``, the v2 routes) or
streamed (``stream``, generated tokens relayed as they come). A general client spends most of
its time on what this does not need (cookies, redirects, multipart, tracing hooks): per
forwarded request this pool costs about 50 µs of the gateway's CPU where ``aiohttp``
took 120 µs, measured against the same server. What it does:

- one pool of idle connections per origin (scheme, host, port), reused LIFO so the
  warmest socket goes first; at most ``max_idle_per_origin`` are kept, none idle past
  ``idle_s`` (replicas come and go at addresses of their own, and a host that vanished
  never closes its end), and an origin left with none is forgotten;
- a request on a reused connection that fails before any byte of the answer arrived is
  sent once more on a new connection: the server may have closed the idle socket just as
  we picked it, and every request the gateway forwards is idempotent;
- limits: connect timeout, total timeout per request, answer size;
- TCP keep-alive probes on every connection (``keepalive``): a replica's host that lost
  power or its link sends no RST, and a connection to it would otherwise look open for as
  long as the kernel's default (two hours): an idle one until ``idle_s``, and one waiting for
  a whole generated answer, which has no time limit, until the caller gives up. A live
  replica's kernel answers the probes, however long its model takes;
- every failure is an :class:`UpstreamError`, which the gateway turns into failover, but
  the gateway's own: out of file descriptors (``EMFILE``, its ``RLIMIT_NOFILE``; ``ENFILE``,
  the system's), a connection cannot be made to any replica, and none has failed. That is an
  :class:`OutOfDescriptors`, which no route counts against the replica or moves on from (the
  next would need a descriptor too): each answers 503 with a Retry-After. It is logged, at
  most once every :data:`OUT_OF_DESCRIPTORS_LOG_S` with how many came since, as each request
  meets it until descriptors are freed.

A streamed answer (:class:`Stream`) is handed over as soon as its head arrived; its body
(chunked, with a length, or up to the close) is read as it arrives. Reading pauses the
socket once ``STREAM_HIGH_WATER`` bytes wait unread, so a slow caller slows the replica
instead of filling the gateway's memory. Leaving a stream before its end closes the
connection, which is how the replica learns that the caller went away; only a connection
whose body was read to its end goes back to the pool. A failure before the head is an
``UpstreamError`` from ``stream()`` (nothing reached the caller yet: try another
replica); one after it is a :class:`StreamCut` from ``Stream.read()``.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import resource
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import httptools

from edgeplane_proto import hostport
from orchestrator import logthrottle


STREAM_HIGH_WATER = 64 * 1024  # unread bytes of a streamed body at which its socket is paused
#: TCP keep-alive of the connections to replicas: (seconds idle before the first probe, seconds
#: between probes, unanswered probes that end the connection): a vanished host is found in ~25 s.
KEEPALIVE = (10, 5, 3)
#: The Retry-After, in seconds, of a request answered 503 because the gateway is out of file descriptors.
OUT_OF_DESCRIPTORS_RETRY_S = 1
#: The gateway logs that it is out of file descriptors at most once in this many seconds.
OUT_OF_DESCRIPTORS_LOG_S = 10.0

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The replica could not be reached or did not answer properly."""


class UpstreamTimeout(UpstreamError):
    """The replica took the request and gave no answer in time: slow at this one request
    (a huge batch), or stuck; unlike a connection failure, not a sign that it is down."""


class OutOfDescriptors(Exception):
    """No connection could be made because the gateway has no file descriptor left (its
    process's limit, or the system's). Not an :class:`UpstreamError`: no replica failed,
    and none is counted against or ejected for it; the caller is answered 503, to retry
    after ``retry_after`` seconds."""

    retry_after = OUT_OF_DESCRIPTORS_RETRY_S


class StreamCut(UpstreamError):
    """A streamed answer broke off after its head: part of it may have been passed on."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0  # when it last went back to the pool
        self._answer: asyncio.Future[Answer] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._head_done = False
        self.got_bytes = False
        # streamed answers: the head resolves ``_answer``, the body waits in ``_chunks``
        self._streaming = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._paused = False
        self._ended = False
        self._cut: StreamCut | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = f"connection closed{f': {exc}' if exc else ''}"
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(UpstreamError(why))
        elif self._streaming and not self._ended and self._cut is None:
            self._cut = StreamCut(f"{why} before the end of the answer")
            self._wake()

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError) else UpstreamError(f"malformed answer: {exc}"))

    def eof_received(self) -> bool | None:
        # An answer with neither a length nor chunks ends where the stream ends.
        if self._parser is not None and self._head_done and "content-length" not in self._headers \
                and "chunked" not in self._headers.get("transfer-encoding", "").lower():
            self._head_done = False
            self.on_message_complete()
        return None

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._answer is not None and self._answer.done():
            raise UpstreamError("bytes after the answer")  # the connection is out of step: close it

    def on_headers_complete(self) -> None:
        self._head_done = True
        if self._streaming:
            assert self._parser is not None and self._answer is not None
            status = self._parser.get_status_code()
            if not (100 <= status < 200 and status != 101) and not self._answer.done():
                self._answer.set_result(Answer(status, self._headers, b""))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # a chunked body's trailer fields are not headers (RFC 9110 6.5.1)
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        if self._streaming:
            self._chunks.append(body)
            self._queued += len(body)
            if self._queued >= STREAM_HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()
            return
        self._size += len(body)
        if self._size > self._max_body:
            raise UpstreamError(f"answer larger than {self._max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None and self._answer is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (100 Continue, 103 Early Hints): the answer follows
            self._headers, self._body, self._size, self._head_done = {}, [], 0, False
            return
        if self._streaming:
            self._ended = True
            if not self._parser.should_keep_alive() or self.transport is None or self.transport.is_closing():
                self.close()
            self._parser = None
            self._wake()
            return
        answer = Answer(status, self._headers, b"".join(self._body))
        if not self._parser.should_keep_alive() or self.transport is None or self.transport.is_closing():
            self.close()
        self._parser = None
        if not self._answer.done():
            self._answer.set_result(answer)

    def send(self, head: bytes, body: bytes | None, *, streaming: bool = False) -> asyncio.Future[Answer]:
        """Write a request; the future is the whole answer, or only its head when ``streaming``."""
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._body, self._size, self.got_bytes, self._head_done = {}, [], 0, False, False
        self._streaming, self._ended, self._cut, self._queued = streaming, False, None, 0
        self._chunks.clear()
        if self._paused:  # a stream left with its last bytes unread
            self._paused = False
            self.transport.resume_reading()
        self.transport.write(head + body if body else head)
        return self._answer

    async def next_chunk(self) -> bytes:
        """What arrived of a streamed body since the last call; ``b""`` at its end."""
        while not self._chunks:
            if self._cut is not None:
                raise self._cut
            if self._ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._queued = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def ended(self) -> bool:
        """The streamed body arrived whole: the connection is back in step."""
        return self._ended

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        elif self._streaming and not self._ended and self._cut is None:
            self._cut = StreamCut(str(exc))
            self._wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        self._parser = None
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return not self.closed and self._parser is None and self.transport is not None and not self.transport.is_closing()


class Stream:
    """An answer whose head has arrived and whose body is read as it comes.

    ``read()`` until it returns ``b""``, then the connection goes back to the pool; ``close()``
    (or leaving ``async with``, a cancellation included) before that closes it.
    """

    def __init__(self, pool: UpstreamPool, origin: tuple[str, str, int], conn: _Connection, head: Answer) -> None:
        self.status = head.status
        self.headers = head.headers  # lower-case names
        self._pool, self._origin, self._conn = pool, origin, conn
        self._done = False

    async def read(self) -> bytes:
        """The body's bytes that arrived since the last read (waiting for some); ``b""`` at
        the end. A body that breaks off raises :class:`StreamCut` once its bytes are read."""
        if self._done:
            return b""
        try:
            data = await self._conn.next_chunk()
        except StreamCut:
            self.close()
            raise
        if not data:
            self._done = True
            self._pool._release(self._origin, self._conn)
        return data

    async def body(self, limit: int | None = None) -> bytes:
        """The rest of the body, at most ``limit`` bytes (the pool's ``max_body`` by default)."""
        limit = self._pool.max_body if limit is None else limit
        parts: list[bytes] = []
        size = 0
        while data := await self.read():
            size += len(data)
            if size > limit:
                self.close()
                raise StreamCut(f"answer larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Stop reading: an unfinished body closes the connection (the server sees the caller leave)."""
        if not self._done:
            self._done = True
            if self._conn.ended:
                self._pool._release(self._origin, self._conn)
            else:
                self._conn.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class UpstreamPool:
    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        timeout: float = 30.0,
        max_idle_per_origin: int = 32,
        max_body: int = 64 * 1024 * 1024,
        idle_s: float = 60.0,  # under the agent's 75 s: the pool lets go first
        keepalive: tuple[int, int, int] = KEEPALIVE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_idle = max_idle_per_origin
        self.max_body = max_body
        self.idle_s = idle_s
        self.keepalive = keepalive
        self._clock = clock
        self._sweep_at = 0.0
        # origin -> its idle connections, the oldest first
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        self._out_of_descriptors_log = logthrottle.Throttle(OUT_OF_DESCRIPTORS_LOG_S, clock)

    async def request(self, method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None) -> Answer:
        origin, head = _request_head(method, url, body, headers)
        sent = False  # on a connection: a timeout then is the replica's slowness at this request
        try:
            async with asyncio.timeout(self.timeout):
                conn, reused = await self._connection(origin)
                try:
                    sent = True
                    return await self._exchange(origin, conn, head, body)
                except UpstreamError:
                    if not reused or conn.got_bytes:
                        raise
                # The server closed the idle socket just as we took it: once more, on a new one.
                sent = False
                conn, _ = await self._connection(origin, fresh=True)
                sent = True
                return await self._exchange(origin, conn, head, body)
        except TimeoutError:
            raise (UpstreamTimeout if sent else UpstreamError)(f"no answer within {self.timeout:g}s") from None

    async def stream(self, method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None) -> Stream:
        """Send a request and return once the answer's head arrived, its body still to read.

        No overall time limit (a generation takes as long as it takes): the caller bounds
        the wait for the head and between reads. Every failure before the head is an
        ``UpstreamError``, and a reused connection found closed is replaced as in ``request``.
        """
        origin, head = _request_head(method, url, body, headers)
        conn, reused = await self._connection(origin)
        try:
            answer = await self._send_streaming(conn, head, body)
        except UpstreamError:
            if not reused or conn.got_bytes:
                raise
            conn, _ = await self._connection(origin, fresh=True)
            answer = await self._send_streaming(conn, head, body)
        return Stream(self, origin, conn, answer)

    @staticmethod
    async def _send_streaming(conn: _Connection, head: bytes, body: bytes | None) -> Answer:
        try:
            return await conn.send(head, body, streaming=True)
        except BaseException:
            conn.close()
            raise

    async def _exchange(self, origin: tuple[str, str, int], conn: _Connection, head: bytes, body: bytes | None) -> Answer:
        try:
            answer = await conn.send(head, body)
        except BaseException:
            conn.close()
            raise
        self._release(origin, conn)
        return answer

    async def _connection(self, origin: tuple[str, str, int], *, fresh: bool = False) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        while idle and not fresh:
            conn = idle.pop()
            if self._clock() - conn.idle_since >= self.idle_s:
                # Past its time, and so is every older one: the replica may have closed them
                # (its keep-alive is 75 s) without our having read it yet. The sweep runs only
                # as connections go back, at most once per idle_s: it cannot be relied on here.
                conn.close()
                while idle:
                    idle.pop().close()
            elif conn.reusable:
                return conn, True
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_body), host, port,
                    ssl=self._ssl_context() if scheme == "https" else None,
                )
        except TimeoutError:
            raise UpstreamError(f"connect to {hostport.address(host, port)} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise self._out_of_descriptors(exc) from None
            raise UpstreamError(f"connect to {hostport.address(host, port)} failed: {exc.strerror or exc}") from None
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keep_alive(sock, self.keepalive)
        return conn, False

    def _out_of_descriptors(self, exc: OSError) -> OutOfDescriptors:
        """What to raise for ``exc``, a connection that ``EMFILE`` or ``ENFILE`` kept from
        being made, logged for the operator at most once every :data:`OUT_OF_DESCRIPTORS_LOG_S`."""
        whose = "the system's" if exc.errno == errno.ENFILE else "this process's"
        if (held := self._out_of_descriptors_log.due()) is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            since = f" ({held} more since the last such line)" if held else ""
            log.warning("the gateway is out of file descriptors (%s, %s limit; RLIMIT_NOFILE soft %s, hard %s): it cannot connect "
                        "to replicas and answers their requests 503; raise the limit (ulimit -n, systemd LimitNOFILE=) or "
                        "find what holds them%s", exc.strerror, whose, soft, hard, since)
        return OutOfDescriptors(f"the gateway is out of file descriptors ({exc.strerror}) and could not connect to a replica; "
                                f"retry in {OUT_OF_DESCRIPTORS_RETRY_S} s")

    def _release(self, origin: tuple[str, str, int], conn: _Connection) -> None:
        if self._closed or not conn.reusable:
            conn.close()
            return
        now = self._clock()
        conn.idle_since = now
        idle = self._idle.setdefault(origin, collections.deque())
        idle.append(conn)
        while len(idle) > self.max_idle:
            idle.popleft().close()
        if now >= self._sweep_at:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close the connections idle for ``idle_s`` and forget the origins left with none
        (at most once per ``idle_s``: a request pays for no walk over every origin). It frees
        the sockets of replicas no longer asked; that none is reused past its time is
        ``_connection``'s check."""
        self._sweep_at = now + self.idle_s
        stale = now - self.idle_s
        for origin, idle in list(self._idle.items()):
            while idle and idle[0].idle_since <= stale:
                idle.popleft().close()
            if not idle:
                del self._idle[origin]

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()


def _keep_alive(sock: socket.socket, keepalive: tuple[int, int, int]) -> None:
    """Probe ``sock``'s peer after ``keepalive[0]`` s of silence, every ``keepalive[1]`` s,
    and drop it after ``keepalive[2]`` unanswered probes (where the platform lets these be set:
    Linux does; elsewhere the system's own timings apply)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), keepalive, strict=True):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _request_head(method: str, url: str, body: bytes | None, headers: Mapping[str, str] | None) -> tuple[tuple[str, str, int], bytes]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"cannot forward to {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port out of range or not a number: this replica fails, the next is tried
        raise UpstreamError(f"cannot forward to {url!r}: {exc}") from None
    host = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}", f"content-length: {len(body) if body else 0}"]
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return (parts.scheme, parts.hostname, port), ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
