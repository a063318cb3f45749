"""A small TCP proxy that misbehaves on purpose: delay, jitter, blackhole, cut.

It sits between an agent and the control plane's gRPC port (loopback only). Each
direction of each connection is a pump that holds every chunk for ``delay + U(0, jitter)``
seconds while keeping byte order (a chunk never overtakes the one before it), which is how
a slow, jittery link behaves. ``blackhole()`` silently drops everything and holds new
connections open without an upstream, like a partition; ``heal()`` ends the partition by
resetting the connections that lived through it, so both ends reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field


@dataclass
class Faults:
    delay: float = 0.0
    jitter: float = 0.0
    blackhole: bool = False


@dataclass
class ChaosProxy:
    upstream_host: str
    upstream_port: int
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    connections: int = 0

    async def start(self) -> ChaosProxy:
        self._rng = random.Random(self.seed)
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blackhole(self) -> None:
        self.faults.blackhole = True

    def heal(self) -> None:
        """End a partition: connections that lived through it are reset."""
        self.faults.blackhole = False
        self.cut()

    def cut(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self.faults.blackhole:
            return  # held open, nothing ever answers; heal() resets it
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        self._spawn(self._pump(reader, up_writer))
        self._spawn(self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the injected latency itself
                if not self.faults.blackhole:
                    writer.write(chunk)
                    await writer.drain()

        sender = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while chunk := await reader.read(65536):
                if self.faults.blackhole:
                    continue
                due = time.monotonic() + self.faults.delay + self._rng.uniform(0, self.faults.jitter)
                last_due = max(last_due, due)  # order kept: never before the previous chunk
                queue.put_nowait((last_due, chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            for _ in range(100):  # let what was already accepted drain (bounded)
                if queue.empty() or sender.done():
                    break
                await asyncio.sleep(0.01)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            with contextlib.suppress(Exception):
                writer.close()
