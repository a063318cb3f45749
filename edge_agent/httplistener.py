"""The agent's HTTP listener: which connections it takes in, and how it lets them go.

Apart from ``edge_agent.httpserver``, which speaks HTTP/1.1 on one connection (parsing,
keep-alive, limits, writing), because this half is the agent's contract with the gateway
and the process rather than with one client: how many connections are served at once
(one more is answered 503 at once, so that a flood of idle connections leaves descriptors
for model loads, downloads and the control-plane link), and the drain on shutdown. A
drain lets in-flight requests finish; the listener stays open meanwhile, and a connection
made then (a gateway's, its idle one closed) is answered 503 ``draining`` with Retry-After
and not waited for, so that callers fail over and retry instead of reading a refused
connection as a fault (a 502 when no replica is left).

A connection sees its server through ``httpserver.Server``, so the connection half does
not import this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from dataclasses import dataclass

import edge_agent
from edge_agent import httpserver, inflight
from edge_agent.httpmessages import Handler
from edgeplane_proto import logformat

DEFAULT_MAX_BODY_BYTES = edge_agent.DEFAULT_MAX_REQUEST_BYTES

#: The most one read takes from a connection. The buffer is an anonymous mapping: memory
#: is only used as reads reach into it.
READ_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = 64 * 1024
    # One window from a request's first byte for its head and the first BODY_PROGRESS_BYTES
    # (httpserver's) of its body together (the head's end does not start a new one: one timer
    # per request), then a new one each time a further BODY_PROGRESS_BYTES has come: a large
    # batch over a slow link is not cut off while it keeps coming, a stalled or trickling one is.
    request_timeout: float = 30.0
    idle_timeout: float = 75.0  # keep-alive connection with nothing to do
    # A client that reads nothing of its answer for this long is cut off: its stream's
    # producer (a generation holding a sequence slot) is closed instead of waiting forever.
    write_timeout: float = 60.0
    max_pipelined: int = 32  # requests read ahead of the one being answered
    # Connections served at once; one more is answered 503 and closed. 0: half the process's
    # descriptor limit, so that a flood of idle connections leaves the other half to model
    # loads, downloads and the control-plane link (see default_max_connections).
    max_connections: int = 0


def default_max_connections() -> int:
    """Half the soft limit on open descriptors (at least 64)."""
    soft = os.sysconf("SC_OPEN_MAX")  # RLIMIT_NOFILE's soft limit, -1 when there is none
    return 1 << 16 if soft < 0 else max(64, soft // 2)


class HttpServer:
    """Serves ``handler`` on a bound, listening-ready socket."""

    def __init__(self, handler: Handler, limits: Limits | None = None, budget: inflight.Budget | None = None,
                 access: logformat.AccessLog | None = None) -> None:
        """``budget``: the memory requests in flight may hold (``edge_agent.inflight``; none:
        no bound), shared with whatever else charges it (the agent's gRPC server).
        ``access``: where each answered request's access line goes (``--access-log``,
        ``edgeplane_proto.logformat``); None: nowhere."""
        self.handler = handler
        self.access = access
        self.limits = limits or Limits()
        self.budget = budget or inflight.Budget()
        self.max_connections = self.limits.max_connections or default_max_connections()
        self.turned_away = 0  # connections answered 503 at once: max_connections were open
        self.connections: set[httpserver._Connection] = set()
        self.late: set[httpserver._Connection] = set()  # made during the drain: refused, and not waited for
        self.stopping = False
        self.pending = 0  # requests received and not answered yet, on every connection
        self._server: asyncio.Server | None = None
        self._all_closed = asyncio.Event()
        self._read_buffer: memoryview | None = None

    @property
    def read_buffer(self) -> memoryview:
        """Where every connection of this server reads to (one loop: one read at a time)."""
        if self._read_buffer is None:
            self._read_buffer = memoryview(mmap.mmap(-1, READ_BUFFER_BYTES))
        return self._read_buffer

    def admit(self, conn: httpserver._Connection) -> httpserver.Admission:
        """Take in a connection just made (:data:`httpserver.Admission`); one made during
        the drain counts towards ``max_connections`` too."""
        if len(self.connections) + len(self.late) >= self.max_connections:
            self.turned_away += 1
            return "full"
        (self.late if self.stopping else self.connections).add(conn)
        return "late" if self.stopping else "serving"

    def forget(self, conn: httpserver._Connection) -> None:
        self.connections.discard(conn)
        self.late.discard(conn)
        if not self.connections:
            self._all_closed.set()

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: httpserver._Connection(self), sock=sock, backlog=1024)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections, let busy ones answer (up to ``timeout``): a request still
        arriving is busy too, and is answered (``connection: close``) once whole. New
        connections are refused with 503 meanwhile (a closed listener would read as a fault
        to the gateway, a 502 when no replica is left), then the listener closes."""
        self.stopping = True
        for conn in list(self.connections):
            if conn.idle and not conn.receiving:
                conn.close()
        if self.connections:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._all_closed.wait()
        if self._server is not None:
            self._server.close()
        for conn in [*self.connections, *self.late]:  # the drain time is spent: unread answers are dropped too
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
