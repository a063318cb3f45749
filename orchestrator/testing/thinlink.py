"""A thin, lossy uplink on loopback: a TCP proxy that throttles, stalls and cuts what flows
from a server back to its client.

Why: an edge site on a 4G backup or a satellite link gets its artifacts at a few Mbit/s,
through stalls of tens of seconds (bytes stop, the connection stays open) and connections
cut in the middle of a transfer. Tests put this proxy between an agent and a real artifact
server, scaled down (a few MB, a few hundred kB/s) so that they take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class ThinLink:
    """Forwards 127.0.0.1:``port`` to ``upstream`` (host, port). Downstream bytes are
    throttled to ``rate`` bytes a second, all connections together: one link, which
    connections in parallel share (None: as fast as they come); each connection is
    cut (both sides closed) once ``cut_after`` bytes went down it (None: never); while
    :attr:`flowing` is clear nothing goes down, the connections staying open."""

    def __init__(self, upstream: tuple[str, int], *, rate: float | None = None, cut_after: int | None = None) -> None:
        self.upstream, self.rate, self.cut_after = upstream, rate, cut_after
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connections = 0
        self.sent = 0  # bytes sent down, all connections together
        self._free_at = 0.0  # (loop time) when the link has sent what it was given
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> ThinLink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        up = asyncio.create_task(self._pipe_up(client_r, server_w))
        try:
            await self._pipe_down(server_r, client_w)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            up.cancel()
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    @staticmethod
    async def _pipe_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _pipe_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sent = 0
        piece = 16384 if self.rate is None else max(1, min(16384, int(self.rate / 20)))
        while True:
            limit = piece if self.cut_after is None else min(piece, self.cut_after - sent)
            if limit <= 0:
                return  # cut in the middle of the transfer
            data = await reader.read(limit)
            if not data:
                return
            await self.flowing.wait()
            if self.rate is not None:  # the link's pace, shared: each piece waits for those before it
                self._free_at = max(loop.time(), self._free_at) + len(data) / self.rate
                await asyncio.sleep(self._free_at - loop.time())  # (a pace, not an event to await)
                await self.flowing.wait()
            writer.write(data)
            await writer.drain()
            sent += len(data)
            self.sent += len(data)
