"""The agent's HTTP/1.1 connections: asyncio protocol + httptools (the llhttp parser).

The agent serves one small, fixed API (``edge_agent.http``), so it does not carry an ASGI
server and web framework: together they were 8 MB of the idle agent's resident memory and
about half of the per-request overhead. Parsing is llhttp's; what is here is connection
handling (the messages and their bytes are ``edge_agent.httpmessages``'s; the listener,
which connections are taken in and the drain, ``edge_agent.httplistener``'s):

- keep-alive (HTTP/1.1 default, ``Connection: close``, HTTP/1.0's ``Connection:
  keep-alive``, echoed), pipelined requests answered in order, one at a time per connection;
- ``Expect: 100-continue`` answered before the body is read (curl sends it for bodies
  over 1 KiB);
- limits: header bytes (431), body bytes (413, refused from ``Content-Length`` before the
  body is read), time to receive a whole request, idle keep-alive time; and the memory of
  all requests in flight (``edge_agent.inflight``): each body is charged from its
  ``Content-Length`` (a chunked one as it arrives), refused 503 when the requests in flight
  hold the budget, and given back once its answer is written or the request fails;
- malformed input gets a 400 and the connection is closed; a handler's exception a 500;
  nothing a client sends stops the server. These errors are shaped for the API the request
  was for (``edge_agent.refusals``: OpenAI's error object under ``/v1``), and a body still on
  its way when refused is read and dropped before the close, so the client reads its answer;
- write flow control (a client that does not read does not grow our buffers without
  bound); during a drain, each answer closes its connection, an idle one closes, and a
  connection made then is answered 503 ``draining`` with Retry-After.

Each response goes out in a single ``write`` (head and body together), so Nagle's
algorithm never holds a body back waiting for the client's delayed ACK.

Reads go into one buffer per server (``httplistener.READ_BUFFER_BYTES``), parsed as soon
as they are read: the parser keeps copies of what it needs, so no bytes object is made per
read, and a body of up to a few MiB that has arrived is read whole (a request of a batch of
64 rows of 1,024 float32 values took two reads and two turns of the loop with asyncio's own
256 KiB).

A stream whose items are made on another thread (a generation's tokens) may write them
itself (:class:`Passthrough`, in ``edge_agent.httpstream``) instead of waking the event loop
for each one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import urllib.parse
from typing import TYPE_CHECKING, Literal, Protocol, cast

import httptools

from edge_agent import access as access_line
from edge_agent import eagertask, inflight, refusals
from edge_agent.httpmessages import Handler, Request, Response, encode, encode_stream_head
from edge_agent.httpmessages import request_id as request_id_of
# Streamed answers are their own module; handlers and tests know them by these names too.
from edge_agent.httpstream import LAST_CHUNK, Passthrough, StreamingResponse, encode_chunk
from edgeplane_proto import correlation, logformat
from edgeplane_proto.headers import DRAINING

if TYPE_CHECKING:  # the listener imports this module to make its connections
    from edge_agent import httplistener

log = logging.getLogger(__name__)


BODY_PROGRESS_BYTES = 64 * 1024  # 2 KiB/s at the default request timeout


#: What the server makes of a connection just made: served; made during the drain (each of its
#: requests is answered 503 draining, and the drain does not wait for it); or turned away at
#: once, as ``max_connections`` are open.
Admission = Literal["serving", "late", "full"]


class Server(Protocol):
    """What a connection reads and keeps up to date of the server it is one of
    (``httplistener.HttpServer``)."""

    handler: Handler
    access: logformat.AccessLog | None  # where access lines go (--access-log); None: nowhere
    limits: httplistener.Limits
    max_connections: int
    stopping: bool  # draining: each answer closes its connection, and an idle one closes
    pending: int  # requests received and not answered yet, on every connection
    budget: inflight.Budget  # the memory requests in flight may hold, all connections together

    @property
    def read_buffer(self) -> memoryview: ...

    def admit(self, conn: _Connection) -> Admission: ...

    def forget(self, conn: _Connection) -> None: ...


def _error(status: int, message: str, code: str, path: str | None) -> Response:
    """An error the server answers itself, shaped for the API of ``path`` (see ``refusals``)."""
    return Response(status, refusals.error_body(status, message, code, path))


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Refused(Exception):
    """Raised in a parser callback: answer ``response`` and close. ``drain``: the client may
    still be sending the request (see ``_Connection._close_refused``)."""

    def __init__(self, response: Response, drain: bool = False) -> None:
        super().__init__(response.status)
        self.response = response
        self.drain = drain


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[tuple[Request, bool]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # loop time the connection times out at; None: never
        self._writable = asyncio.Event()
        self._writable.set()
        self._write_timer: asyncio.TimerHandle | None = None  # see _watch_writes
        self._unsent = 0  # bytes buffered for the client when the write timer was set
        self._closing = False
        self._reading = True
        self._in_message = False
        self._continue_owed = False  # a 100 Continue to send once earlier answers are out
        self._last_words: Response | None = None  # a refusal waiting for earlier answers
        self._drain_after = False  # ... and whether to drain the refused request once it is out
        self._passthrough: Passthrough | None = None  # the socket lent to a stream's thread
        self._late = False  # made during the drain: each request is answered 503 draining
        self._body_out = 0  # body bytes of the answer being written (for its access line)
        self._reset()

    def _reset(self) -> None:
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._in_body = False
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._rearm_at = BODY_PROGRESS_BYTES
        self._hold: inflight.Hold | None = None  # what the request being received holds of the budget: its body

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        admission = self._server.admit(self)
        if admission == "full":
            # Not read: the client may see a reset instead of the answer when its request
            # arrived first. What matters is that the descriptors keep a margin.
            self._closing = True
            self._transport.write(encode(_error(503, f"this agent serves {self._server.max_connections} connections at "
                                                     "once; try again", "too_many_connections", None), keep_alive=False))
            self._transport.close()
            return
        self._late = admission == "late"
        self._arm(self._limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._end_passthrough()
        self._server.pending -= len(self._queue)  # received, never to be answered
        for request, _ in self._queue:
            if request.hold is not None:
                request.hold.release()
        self._queue.clear()
        self._let_go_of_receiving()
        self._stop_timer()
        self._stop_watching_writes()
        self._server.forget(self)
        self._writable.set()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received(self._server.read_buffer[:nbytes])

    def received(self, data: bytes | memoryview) -> None:
        """Parse what was read and start answering what it completed. The parser copies
        what it keeps, so ``data`` is free for the next read once this returns."""
        if self._closing or self._last_words is not None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            last = self._queue[-1][0] if self._queue else None
            path = self._target()
            if last is not None and ("upgrade" in last.headers or last.method == "CONNECT"):
                self._queue.pop()  # the parser completed the upgrade request: it is not served
                self._server.pending -= 1
                if last.hold is not None:
                    last.hold.release()
                path = last.path
            self._refuse(_error(400, "protocol upgrades are not supported", "upgrade_not_supported", path))
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised; a refusal carries its own answer
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.response, drain=cause.drain)
            else:
                self._refuse(_error(400, f"malformed HTTP request: {exc}", "malformed_request", self._target()))
        # Answering starts once the whole read is parsed, so the handler sees every request
        # that arrived with this one (``Server.pending``).
        if self._queue and (self._worker is None or self._worker.done()):
            self._worker = eagertask.start(self._loop, self._answer())

    def pause_writing(self) -> None:
        self._writable.clear()
        self._watch_writes()

    def resume_writing(self) -> None:
        self._writable.set()
        if not self._closing:  # a closing connection's last bytes are watched to the end
            self._stop_watching_writes()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._in_message = True
        self._arm(self._limits.request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        if not self._in_body:  # a chunked body's trailer fields count, but are not headers (RFC 9110 6.5.1)
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_body = True
        if self._late:  # refused before its body, which is read and dropped
            raise _Refused(Response(503, refusals.error_body(503, "the agent is stopping; retry at another replica", "draining",
                                                             self._target()), headers=(("retry-after", "1"), (DRAINING, "1"))), drain=True)
        declared = self._headers.get("content-length")
        if declared is not None and declared.isdigit():
            size = int(declared)
            if size > self._limits.max_body_bytes:
                raise self._too_large()
            if size:  # charged before a byte of it is read (or a 100 Continue asks for it)
                taken = self._server.budget.take(size, "its body")
                if not isinstance(taken, inflight.Hold):
                    raise self._refused(taken)
                self._hold = taken
        if self._headers.get("expect", "").lower() == "100-continue":
            if self.idle:
                self._write(_CONTINUE)
            else:  # it would reach the client before the answers it is still waiting for
                self._continue_owed = True

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise self._too_large()
        self._body.append(body)
        hold = self._hold
        if hold is None or self._body_bytes > hold.bytes:  # a chunked body: charged as it arrives
            self._charge(self._body_bytes - (0 if hold is None else hold.bytes))
        if self._body_bytes >= self._rearm_at:
            self._rearm_at = self._body_bytes + BODY_PROGRESS_BYTES
            self._arm(self._limits.request_timeout)

    def on_message_complete(self) -> None:
        url = bytes(self._url)
        if url[:1] == b"/" and b"?" not in url and b"%" not in url and b"#" not in url:  # a plain path: taken as it is
            path, query = url.decode("latin-1"), ""
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Refused(_error(400, "malformed request target", "malformed_request", self._target())) from None
            path = urllib.parse.unquote((parsed.path or b"/").decode("latin-1"))
            query = (parsed.query or b"").decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(
            method=self._parser.get_method().decode("latin-1"),
            path=path,
            query=query,
            headers=self._headers,
            body=body,
            hold=self._hold,
        )
        self._hold = None  # the request's now: given back once it is answered
        self._queue.append((request, self._parser.should_keep_alive()))
        self._server.pending += 1
        self._in_message = False
        self._continue_owed = False
        self._disarm()
        if len(self._queue) >= self._limits.max_pipelined and self._transport is not None:
            self._transport.pause_reading()
            self._reading = False

    # -- answering -------------------------------------------------------------------------

    async def _answer(self) -> None:
        while self._queue and not self._closing:
            request, keep_alive = self._queue.popleft()
            access = self._server.access
            started = time.perf_counter() if access is not None else 0.0
            written: int | None = None  # the status of the answer written
            self._body_out = 0
            try:
                if not self._reading and self._last_words is None and self._transport is not None:
                    self._transport.resume_reading()
                    self._reading = True
                request_id = request_id_of(request.headers)  # returned on the answer, and named if it fails
                try:
                    response = await self._server.handler(request)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s %s failed%s", request.method, request.path, correlation.in_log(request_id))
                    response = _error(500, "internal error", "internal_error", request.path)
                finally:
                    self._server.pending -= 1
                keep_alive = keep_alive and not self._server.stopping
                if isinstance(response, StreamingResponse):
                    written = response.status
                    if not await self._stream(response, keep_alive, request_id):
                        return
                    if not keep_alive:
                        self.close()
                        return
                    continue
                # (room to write, the usual case, is checked here: it makes no coroutine)
                if (self._closing or not self._writable.is_set()) and not await self._wait_writable():
                    return
                self._transport.write(encode(response, keep_alive, head_only=request.method == "HEAD",
                                             announce="connection" in request.headers, request_id=request_id))
                written, self._body_out = response.status, 0 if request.method == "HEAD" else len(response.body)
                if not keep_alive:
                    self.close()
                    return
            finally:  # the answer is written, or will never be: what the request held is given back
                if request.hold is not None:
                    request.hold.release()
                if access is not None:
                    access_line.log(access, request, request_id_of(request.headers), written, self._body_out, started)
        if self._closing:
            return
        if self._last_words is not None:
            self._write(encode(self._last_words, keep_alive=False))
            self._close_refused(self._drain_after)
        elif self._continue_owed:
            self._continue_owed = False
            self._write(_CONTINUE)
        elif not self._in_message:  # a request half received keeps its own timer
            self._arm(self._limits.idle_timeout)
            if self._server.stopping:
                self.close()

    async def _stream(self, response: StreamingResponse, keep_alive: bool, request_id: str | None) -> bool:
        """Send a chunked response; False when the client went away first (the producer
        is closed either way). A producer that fails mid-stream ends the connection
        without the last chunk, so the client sees a truncated body, never a complete one,
        and the log names the request's ``request_id``."""
        chunks = response.chunks
        passthrough = None
        try:
            if not await self._wait_writable():
                return False
            self._transport.write(encode_stream_head(response, keep_alive, request_id))
            if response.passthrough is not None:
                passthrough = self._passthrough = Passthrough(self._loop, self._transport)
                response.passthrough(passthrough)
            while True:
                if passthrough is not None:
                    passthrough.lend()
                try:
                    data = await anext(chunks)
                except StopAsyncIteration:
                    break
                finally:
                    if passthrough is not None:
                        passthrough.take_back()
                if not data:
                    continue
                if not await self._wait_writable():  # back-pressure: wait until the client reads
                    return False
                self._transport.write(encode_chunk(data))
                self._body_out += len(data)
            if not await self._wait_writable():
                return False
            self._transport.write(LAST_CHUNK)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream failed%s", correlation.in_log(request_id))
            self.close()
            return False
        finally:
            if passthrough is not None:
                self._body_out += passthrough.bytes
            self._end_passthrough()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())

    async def _wait_writable(self) -> bool:
        """True once the client has room for more; False when the connection is gone (a
        client that reads nothing for ``write_timeout`` is dropped: ``_watch_writes``). Gone
        includes a transport that a failed write closed: asyncio calls ``connection_lost``
        for it only once the loop runs, which a producer whose items are ready at once never
        lets it do; until then each write would go nowhere, and the producer run to its end."""
        if not self._writable.is_set():
            await self._writable.wait()
        return self._transport is not None and not self._closing and not self._transport.is_closing()

    def _watch_writes(self) -> None:
        """Drop the client unless it reads some of what is buffered for it within
        ``write_timeout``: set when the buffer fills, and when a connection closes with bytes
        unsent (an answer written whole, or a close's flush, waits on a client that may
        never read)."""
        if self._write_timer is None and self._transport is not None:
            self._unsent = self._transport.get_write_buffer_size()
            self._write_timer = self._loop.call_later(self._limits.write_timeout, self._writes_due)

    def _writes_due(self) -> None:
        self._write_timer = None
        unsent = self._transport.get_write_buffer_size() if self._transport is not None else 0
        if 0 < unsent < self._unsent:  # the client reads, slowly
            self._watch_writes()
        elif unsent and (self._closing or not self._writable.is_set()):
            log.warning("dropping a connection whose client read nothing for %.0fs", self._limits.write_timeout)
            self.abort()

    def _stop_watching_writes(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    @property
    def idle(self) -> bool:
        return not self._queue and (self._worker is None or self._worker.done())

    @property
    def receiving(self) -> bool:
        """A request has begun to arrive and is not whole yet (its own timer bounds it)."""
        return self._in_message

    def _refuse(self, response: Response, drain: bool = False) -> None:
        """Answer an unusable request and close: what follows on the wire is unreadable.
        Requests before it that are still being answered get their answers first."""
        self._let_go_of_receiving()
        if self._closing or self._last_words is not None:
            return
        if self._in_message and (request_id := request_id_of(self._headers)) is not None:  # the head as far as it came
            response = dataclasses.replace(response, headers=(*response.headers, (correlation.HEADER, request_id)))
        if not self.idle:
            self._last_words, self._drain_after = response, drain
            self._disarm()
            if self._transport is not None:
                self._transport.pause_reading()
            return
        self._write(encode(response, keep_alive=False))
        self._close_refused(drain)

    def _close_refused(self, drain: bool) -> None:
        """Close once a refusal is written. ``drain``: the client may still be sending the
        refused request (a head or body over the limit), and an HTTP/1.1 client reads no answer
        before it has sent its whole request. Closed with bytes of it unread, the socket
        would reset the connection, and the reset takes the refusal with it: the client
        sees a dropped connection (a retry, for OpenAI's SDK) instead of a 413. So the
        answer is followed by our end of the stream, and what still comes is read and
        dropped (``received`` drops all once closing) until the client closes, for
        ``request_timeout`` at most."""
        transport = self._transport
        if not drain or transport is None or self._closing:
            self.close()
            return
        self._closing = True  # nothing more is parsed or written
        transport.resume_reading()
        self._reading = True
        if transport.can_write_eof():
            transport.write_eof()
        self._arm(self._limits.request_timeout)

    def _target(self) -> str | None:
        """The path of the request being received, as far as it came (for a refusal's shape)."""
        return refusals.target_path(self._url) if self._in_message else None

    def _charge(self, n: int) -> None:
        """Charge the request being received ``n`` more bytes of a chunked body; refused (503,
        or 413 past the whole budget) when they do not fit."""
        if self._hold is None:
            taken = self._server.budget.take(n, "its body")
            if isinstance(taken, inflight.Hold):
                self._hold = taken
                return
            refused = taken
        else:
            refused = self._hold.grow(n, "its body")
            if refused is None:
                return
        raise self._refused(refused)

    def _refused(self, refused: inflight.Refused) -> _Refused:
        """The answer to a request whose body does not fit the budget: its body still on its
        way is read and dropped."""
        headers = () if refused.retry_after is None else (("retry-after", str(refused.retry_after)),)
        return _Refused(Response(refused.status, refusals.error_body(refused.status, refused.message, refused.code,
                                                                     self._target()), headers=headers), drain=True)

    def _let_go_of_receiving(self) -> None:
        """The request being received will not be served: what it held is given back."""
        if self._hold is not None:
            self._hold.release()
            self._hold = None

    def _too_large(self) -> _Refused:
        return _Refused(_error(413, f"request body exceeds {self._limits.max_body_bytes} bytes", "request_too_large",
                               self._target()), drain=True)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._closing:
            self._transport.write(data)

    def close(self) -> None:
        """Close once what is buffered is sent (``_watch_writes`` bounds the wait)."""
        self._closing = True
        self._end_passthrough()
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()
            if self._transport.get_write_buffer_size():
                self._watch_writes()

    def abort(self) -> None:
        """Close without flushing: what is buffered for a client that does not read is dropped."""
        self._closing = True
        self._end_passthrough()
        self._stop_timer()
        if self._transport is not None:
            self._transport.abort()

    def _end_passthrough(self) -> None:
        if self._passthrough is not None:
            self._passthrough.close()
            self._passthrough = None

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._limits.max_header_bytes:
            raise _Refused(_error(431, f"request head exceeds {self._limits.max_header_bytes} bytes", "request_head_too_large",
                                  self._target()), drain=True)

    def _arm(self, seconds: float) -> None:
        """Time the connection out ``seconds`` from now. A timer already set to fire no
        later is kept, and moves itself on when it fires early: a keep-alive connection
        arms twice per request, and a new timer each time (made, pushed on the loop's heap,
        cancelled) was a tenth of a tiny request's time on the loop."""
        deadline = self._loop.time() + seconds
        if self._timer is None or self._timer.when() > deadline:
            self._stop_timer()
            self._timer = self._loop.call_at(deadline, self._expired)
        self._deadline = deadline

    def _disarm(self) -> None:
        """No timeout until the next ``_arm``; a timer still set finds nothing to do."""
        self._deadline = None

    def _stop_timer(self) -> None:
        """Disarm for good: the connection is closing (the loop lets go of it at once)."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        if self._loop.time() < self._deadline:  # armed again since: fire then
            self._timer = self._loop.call_at(self._deadline, self._expired)
            return
        self._deadline = None
        if self._closing or (self.idle and not self._in_message):
            self.close()  # a refused request drained long enough, or an idle keep-alive connection: just close
        else:
            self._refuse(_error(408, "request not received in time", "request_timeout", self._target()))
