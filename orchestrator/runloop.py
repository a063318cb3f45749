"""How the long-running commands (``edgeplane serve``, ``edgeplane gateway``) run: their event
loop on uvloop when it is installed (it is, with uvicorn[standard] and Ray; a gateway's
per-request cost is mostly event-loop overhead), until SIGINT or SIGTERM, and their HTTP
server.

A stop signal stops them cleanly whenever it comes, as it does the agent (``edge_agent.main``):
its handlers are in place before the service starts and before its first line of output, so
a supervisor or a script that stops it as soon as it reads the banner gets a clean stop; one
that comes during start-up stops the service once it has started. Once stopped, the process
ends without waiting for worker threads still at work (the agent's way too), and so does
one whose stop failed (exit code 1): the stop is bounded, the threads are not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, NoReturn, Protocol, TypeVar

import uvicorn

from edgeplane_proto import logformat
from orchestrator.api import problems

log = logging.getLogger(__name__)

#: What stops ``serve`` and the gateway (cleanly, exit code 0), whenever it comes. A second
#: one, while the stop goes on, ends the process at once (exit code 1): the operator insists.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: What a SIGHUP (logrotate's habit, a closed terminal or ssh session) does: nothing but say
#: so, as the agent does. Its default action would end the process without a stop. There is
#: nothing to re-read: the log goes to stderr, for whoever collects it to rotate.
HANGUP = "SIGHUP: nothing to reload (the log goes to stderr); still serving"


class Service(Protocol):
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Service)

#: Idle keep-alive connections are kept this long (uvicorn's default is 5 s). Clients keep
#: theirs for 5 s too (httpx), so with equal limits a request sent on a pooled connection
#: just as the server closed it failed with a reset; 75 s is what the agent's own server keeps.
KEEP_ALIVE_S = 75


def run(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


#: A stop signal this soon after the first is the same stop told twice, not a second one:
#: ``make serve`` stopped by ``kill %1`` (or a service manager signalling the whole group)
#: is signalled by the shell and again by make, which passes SIGTERM on to its children.
SAME_STOP_S = 1.0


async def serve(start: Callable[[], Awaitable[S]], banner: Callable[[S], Iterable[str]], early: list[int]) -> None:
    """Start the service, print its banner, run it until a stop signal, stop it. ``early``:
    stop signals that came before the event loop took them over."""
    stop = asyncio.Event()
    first: list[float] = []

    def stop_signalled(sig: signal.Signals) -> None:
        now = time.monotonic()
        if stop.is_set() and now - first[0] >= SAME_STOP_S:
            log.warning("%s again: exiting now, without finishing the stop", sig.name)
            exit_now(1)
        if not stop.is_set():
            first.append(now)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_signalled, sig)
    loop.add_signal_handler(signal.SIGHUP, log.info, HANGUP)
    if early:
        log.info("stopped (%s came before it started)", signal.Signals(early[0]).name)
        return
    service = await start()
    try:
        if not stop.is_set():  # else the banner would announce a service about to stop
            for line in banner(service):
                say(line)
        await stop.wait()
        say("stopping...")
    finally:
        try:
            await service.stop()
        except BaseException:  # ended here all the same: Python's exit would wait on the worker threads
            log.exception("the stop failed; exiting without it")
            exit_now(1)
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """End the process, its log and stdout flushed. Python's own exit would first wait, with no
    bound, for every worker thread still at work: a pass hashing a large artifact that the
    stop cut short, a distillation's training, a store call on a stalled database."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def say(line: str) -> None:
    """``line`` on stdout, for whoever reads it. The reader may be gone (``serve | tee`` stopped
    with Ctrl-C, a supervisor's log pipe closed): what the process does never depends on its
    output, so the line is dropped, and so is what follows: stdout then goes to /dev/null, as
    Python's documentation advises for a broken pipe (the flush at exit would fail again)."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):  # EPIPE, EIO from a hung-up terminal; ValueError: stdout closed
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


class _HeadWithFirstBody:
    """One response's view of its connection: the first write (the response head) waits
    for the second (the first body bytes) so that both leave in one send, or for the next
    turn of the event loop if the body is not ready by then. uvicorn writes the head as
    soon as the application starts the response; sent alone, a streamed answer's first
    event costs the client a second segment and a second wake-up."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._first = True
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            asyncio.get_running_loop().call_soon(self._flush)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: The most a request head (request line and headers) may take: httptools keeps a head in
#: memory until it is complete, however long (a 1 MB header was read whole).
MAX_HEAD_BYTES = 64 * 1024
_TOO_LARGE = problems.encoded(431, "request head larger than 64 KiB refused")
TOO_LARGE_HEAD = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE))


#: How long the requests in flight at a stop may take to finish (uvicorn's graceful shutdown).
DRAIN_GRACE_S = 5
_STOPPING = "the server is stopping; retry (another replica or gateway, or this one once it is back)"
_STOPPED_BODY = problems.encoded(503, _STOPPING)
#: How a started event stream ends at the grace: an error event, as the gateway ends a stream
#: whose upstream failed (OpenAI's error object), then the end of the stream.
_STOPPED_EVENT = (b"data: " + json.dumps({"error": {"message": _STOPPING, "type": "server_error", "param": None,
                                                    "code": "server_stopping"}}).encode() + b"\n\ndata: [DONE]\n\n")


def _ended_by_the_grace(app: Any, cycle: Any, stopping: Callable[[], bool]) -> Any:
    """``app`` for one request, which the stop may cut: uvicorn cancels what is still in flight
    when :data:`DRAIN_GRACE_S` ends, and would log the cancellation as the application's
    fault (a traceback) and answer it 500. Cut by the stop, a request not yet answered is
    answered 503 with Retry-After (the connection closed), a started event stream ends with an
    error event, any other started answer is cut short (its connection closed, so that its
    caller cannot take it for whole); one line in the log says which."""

    async def run(scope: Any, receive: Any, send: Any) -> None:
        stream = False

        async def watched(message: Any) -> None:
            nonlocal stream
            if message["type"] == "http.response.start":
                stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ()))
            await send(message)

        try:
            await app(scope, receive, watched)
        except asyncio.CancelledError:
            if not stopping():
                raise
            what = f"{scope.get('method', '')} {scope.get('path', '')}"
            if not cycle.response_started:
                log.warning("%s was still in flight at the end of the %g s drain: answered 503", what, DRAIN_GRACE_S)
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", b"%d" % len(_STOPPED_BODY)),
                    (b"retry-after", b"2"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": _STOPPED_BODY})
            elif stream and not cycle.response_complete:
                log.warning("%s was still streaming at the end of the %g s drain: ended with an error event", what, DRAIN_GRACE_S)
                await send({"type": "http.response.body", "body": _STOPPED_EVENT})
            elif not cycle.response_complete:
                log.warning("%s was still answering at the end of the %g s drain: its connection is closed", what, DRAIN_GRACE_S)
                cycle.transport.close()
                cycle.disconnected = True  # as its connection_lost will say: uvicorn has nothing more to log

    return run


def _http_protocol(stopping: Callable[[], bool]) -> Any:
    """uvicorn's httptools protocol, its responses' heads sent with their first body bytes,
    request heads bounded (:data:`MAX_HEAD_BYTES`, answered 431) and requests that the stop
    cuts answered as such (:func:`_ended_by_the_grace`); uvicorn's own choice when httptools
    is not there."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class Protocol(HttpToolsProtocol):  # type: ignore[misc]
        _in_head = True  # reading a request's head (or waiting for one)
        _received = 0  # what the reads that ended inside the current head held: bounds a head never completed
        _parsed = 0  # the current head's request line and headers as parsed: bounds a head that arrived in one read
        _too_large = False

        def data_received(self, data: bytes) -> None:
            was_in_head = self._in_head
            super().data_received(data)
            if was_in_head and self._in_head:
                self._received += len(data)
                if self._received > MAX_HEAD_BYTES and not self.transport.is_closing():
                    self._refuse()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._received, self._parsed, self._too_large = True, 0, 0, False

        def on_url(self, url: bytes) -> None:
            self._parsed += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._parsed += len(name) + len(value) + 4  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._parsed > MAX_HEAD_BYTES:
                self._too_large = True
                raise ValueError("request head too large")  # the parser stops: answered by send_400_response
            before = self.cycle
            super().on_headers_complete()
            if self.cycle is not None and self.cycle is not before:  # a new request: its task has not run yet
                self.cycle.transport = _HeadWithFirstBody(self.cycle.transport)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            super()._start_asgi_task(cycle, _ended_by_the_grace(app, cycle, stopping))

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                self._refuse()
            else:
                super().send_400_response(msg)

        def _refuse(self) -> None:
            self.transport.write(TOO_LARGE_HEAD)
            self.transport.close()

    return Protocol


def http_server(app: Any) -> uvicorn.Server:
    """uvicorn for ``app``, driven by the caller's loop and signal handling."""
    # log_config None: uvicorn's loggers write through the process's handler, in its format (edgeplane_proto.logformat)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, lifespan="off",
                                           timeout_graceful_shutdown=DRAIN_GRACE_S, limit_concurrency=4096,
                                           timeout_keep_alive=KEEP_ALIVE_S, http=_http_protocol(lambda: server.should_exit)))
    # uvicorn must not take SIGTERM/SIGINT from its caller: since 0.29 it installs its own
    # handlers while it serves (``capture_signals``) and raises a caught signal again when it
    # stops, which cancelled `edgeplane demo` a second time in the middle of its clean stop
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # uvicorn < 0.29
    return server


def main(log_level: str, start: Callable[[], Awaitable[S]], banner: Callable[[S], Iterable[str]],
         config_errors: tuple[type[Exception], ...], *, log_format: str = "text") -> int:
    """Run ``start()``'s service until a signal; a configuration error is one line and exit
    code 2, an address that cannot be bound (an ``OSError`` naming it) one line and exit code 1.
    The log (``edgeplane_proto.logformat``) goes to stderr in ``log_format`` from the start."""
    early: list[int] = []  # until serve() hands them to the event loop: kept, so that the service stops as it would later
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    # Not SIG_IGN, which the processes it starts (an embedded Ray) would inherit through exec.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: None)
    logformat.configure(log_level, log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        run(serve(start, banner, early))
    except config_errors as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
