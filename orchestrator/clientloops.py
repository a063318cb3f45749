"""An :class:`~orchestrator.client.AsyncClient`'s HTTP clients, one for each event loop it
is used in.

A connection belongs to the event loop that opened it: one kept in the pool after its loop
ended raised ``RuntimeError('Event loop is closed')`` in the next loop to take it (``asyncio.run``
once per call: a script, a synchronous wrapper, a notebook cell run again). So each loop
gets its own ``httpx.AsyncClient``, made the first time the loop sends; those of loops that
ended are let go when another begins, as nothing can close their connections any more.

Each loop's is made on that loop, at its first request, so what it costs is that loop's wait:
the TLS context (the CA certificates read, tens of milliseconds) is made once, with the first,
and shared by all. A transport the caller gave is the caller's: every loop's client sends
through it (so it serves one loop, as its connections are that loop's) and none closes it.
A client closed (``aclose``) stays closed: a call after it raises, as httpx's own did, where
making it a new HTTP client would leave that one's connections for no one to close.
"""

from __future__ import annotations

import asyncio
import threading

import httpx

from orchestrator import proxyenv


class LoopClients:
    """The HTTP clients of the event loops a client is used in."""

    def __init__(self, timeout: httpx.Timeout, transport: httpx.AsyncBaseTransport | None, limits: httpx.Limits = proxyenv.LIMITS) -> None:
        self._timeout = timeout
        self._limits = limits  # of each loop's pool (a transport given has its own)
        self._transport = None if transport is None else _Lent(transport)
        self._tls = None if transport is not None else httpx.create_ssl_context()
        self._by_loop: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._making = threading.Lock()  # loops in other threads may begin at the same time
        self._closed = False
        self._unused: httpx.AsyncClient | None = self._new()  # made now: a proxy it cannot use is an error of the arguments

    def _new(self) -> httpx.AsyncClient:
        try:
            return httpx.AsyncClient(timeout=self._timeout, transport=self._transport or proxyenv.async_transport(self._tls, self._limits),
                                     trust_env=False)
        except proxyenv.UNUSABLE as exc:  # a proxy from the environment httpx cannot use, found as it is mounted
            raise ValueError(proxyenv.explain(exc)) from None

    def current(self) -> httpx.AsyncClient:
        """The HTTP client of the running event loop; ``RuntimeError`` once closed."""
        loop = asyncio.get_running_loop()
        http = self._by_loop.get(loop)
        if http is None:
            with self._making:
                if self._closed:
                    raise RuntimeError("this AsyncClient was closed (aclose): make another to send more")
                # those of loops that ended go: nothing can close their connections now, and
                # their sockets are closed as they are collected
                by_loop = {other: h for other, h in self._by_loop.items() if not other.is_closed()}
                http = by_loop.get(loop) or self._unused or self._new()
                self._unused, by_loop[loop] = None, http
                self._by_loop = by_loop
        return http

    async def aclose(self) -> None:
        """Closes the running loop's HTTP client (and the one made for the first loop, if no
        loop took it), and lets go of the others: no loop sends through them again."""
        with self._making:
            mine, unused = self._by_loop.get(asyncio.get_running_loop()), self._unused
            self._by_loop, self._unused, self._closed = {}, None, True
        for http in (mine, unused):
            if http is not None:
                await http.aclose()


class _Lent(httpx.AsyncBaseTransport):
    """A transport the caller gave: requests go through it, and closing a client leaves it
    open (the caller closes it, as it may send through it elsewhere)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        pass
