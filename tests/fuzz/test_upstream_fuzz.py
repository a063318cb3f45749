"""The gateway's upstream pool (``orchestrator.gateway.upstream``) reading answers it cannot
choose, from a loopback server that writes them in pieces of any size, the loop turning
between pieces.

Sequences of valid answers (a length, chunks with extensions and trailers, or up to the
close; interim 1xx answers before them; HTTP/1.0; ``Connection: close``), each asked for
buffered or streamed on one pool, must each come back exactly: status, headers and body,
whatever the pieces, with connections reused or replaced as the answers allow. Damaged
answers must end in an ``Answer`` or an ``UpstreamError``, nothing else, and the pool must
go on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.gateway.upstream import Answer, UpstreamError, UpstreamPool

from .conftest import FUZZ, TRIED, LoopThread
from .test_http_fuzz import DAMAGE, damaged


@dataclass(frozen=True)
class Scripted:
    """An answer as the server writes it, and what the pool must make of it."""

    raw: bytes
    status: int
    headers: tuple[tuple[str, str], ...]  # as the pool must report them (lower-case names, last wins)
    body: bytes
    closes: bool  # the server closes the connection after it

    def expected(self) -> tuple[int, dict[str, str], bytes]:
        return self.status, dict(self.headers), self.body


NAMES = st.sampled_from(["x-a", "X-B", "content-type", "server", "x-" + "n" * 30])
VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=12)


@st.composite
def answers(draw: st.DrawFn) -> Scripted:
    status = draw(st.sampled_from([200, 201, 206, 301, 400, 404, 429, 500, 502, 503]))
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    framing = draw(st.sampled_from(["length", "chunked", "close"] if version == "1.1" else ["length", "close"]))
    closes = framing == "close" or version == "1.0" or draw(st.integers(0, 4)) == 0
    body = draw(st.binary(max_size=400))
    fields = draw(st.lists(st.tuples(NAMES, VALUE), max_size=4))
    if framing == "length":
        fields.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
    if closes and version == "1.1":
        fields.append(("Connection", "close"))
    raw = b""
    for interim in draw(st.lists(st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n",
                                                  b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]), max_size=2)):
        raw += interim
    raw += f"HTTP/{version} {status} Reason\r\n".encode() + b"".join(f"{n}: {v}\r\n".encode() for n, v in fields) + b"\r\n"
    if framing == "chunked":
        at = 0
        while at < len(body):
            size = draw(st.integers(1, len(body) - at))
            raw += f"{size:x}{';x=y' if draw(st.booleans()) else ''}\r\n".encode() + body[at:at + size] + b"\r\n"
            at += size
        raw += b"0\r\n" + (b"Content-Type: text/html\r\nX-Trailer: t\r\n" if draw(st.booleans()) else b"") + b"\r\n"
    else:
        raw += body
    headers: dict[str, str] = {}
    for name, value in fields:
        headers[name.lower()] = value
    return Scripted(raw, status, tuple(headers.items()), body, closes)


class Server:
    """Answers request ``/r/N`` with ``script[N]``, written in pieces ``cuts`` draws."""

    def __init__(self) -> None:
        self.script: list[Scripted] = []
        self.cuts = random.Random(0)
        self.accepted = 0
        self.finished = asyncio.Event()  # set as a connection's handler ends
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                answer = self.script[int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])]
                rest = memoryview(answer.raw)
                while rest:
                    n = self.cuts.randint(1, 300)
                    writer.write(rest[:n])
                    rest = rest[n:]
                    await writer.drain()
                    for _ in range(self.cuts.choice([0, 1, 2])):
                        await asyncio.sleep(0)  # the pool's socket is read between pieces
                if answer.closes:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.finished.set()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[LoopThread, Server, int]]:
    lt = LoopThread("upstream-fuzz")
    server = Server()
    port = lt.run(server.start())
    try:
        yield lt, server, port
    finally:
        lt.run(server.stop())  # on its loop: asyncio's objects belong to their loop's thread
        lt.close()


def idle_connections(pool: UpstreamPool) -> dict[tuple[str, str, int], list[Any]]:
    """The connections ``pool`` keeps idle, by origin. Read from its private record: the
    pool shows no connection, and a settled exchange waits for it to see the server's close."""
    return {origin: list(idle) for origin, idle in pool._idle.items()}


async def ask(pool: UpstreamPool, url: str, streamed: bool) -> tuple[int, dict[str, str], bytes]:
    if not streamed:
        answer: Answer = await pool.request("GET", url)
        return answer.status, answer.headers, answer.body
    async with await pool.stream("GET", url) as stream:
        return stream.status, stream.headers, await stream.body()


def exchange(lt: LoopThread, server: Server, port: int, script: list[Scripted], how: list[bool], seed: int,
             settle: bool = False) -> list[tuple[int, dict[str, str], bytes] | UpstreamError]:
    """Ask for every answer of ``script`` in turn on one pool: what each ask came back with.
    ``settle``: before each ask after the first, wait for the server to have closed the
    connection, and for the pool to have seen it."""
    errors: list[dict[str, Any]] = []

    async def main() -> list[tuple[int, dict[str, str], bytes] | UpstreamError]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
        server.script, server.cuts = script, random.Random(seed)
        pool = UpstreamPool(timeout=10)
        out: list[tuple[int, dict[str, str], bytes] | UpstreamError] = []
        try:
            for i, streamed in enumerate(how):
                if settle and i:
                    await asyncio.wait_for(server.finished.wait(), 10)
                    for _ in range(1000):  # bounded: a few turns of the loop bring the close
                        if all(conn.closed for idle in idle_connections(pool).values() for conn in idle):
                            break
                        await asyncio.sleep(0)
                server.finished.clear()
                try:
                    out.append(await ask(pool, f"http://127.0.0.1:{port}/r/{i}", streamed))
                except UpstreamError as exc:
                    out.append(exc)
        finally:
            await pool.close()
            loop.set_exception_handler(None)
        return out

    out = lt.run(main(), 60)
    assert not errors, errors
    return out


@FUZZ
@given(st.lists(st.tuples(answers(), st.booleans()), min_size=1, max_size=6), st.integers(0, 2**32))
def test_valid_answers_come_back_exactly(upstream: tuple[LoopThread, Server, int], asks: list[tuple[Scripted, bool]],
                                          seed: int) -> None:
    TRIED["upstream pool: valid answers in pieces"] += 1
    lt, server, port = upstream
    accepted = server.accepted
    script = [answer for answer, _ in asks]
    got = exchange(lt, server, port, script, [streamed for _, streamed in asks], seed)
    assert got == [answer.expected() for answer in script]
    # a connection is opened for the first ask and after each answer that closes one, never more
    assert server.accepted - accepted == 1 + sum(answer.closes for answer in script[:-1])


@FUZZ
@given(answers(), DAMAGE, st.booleans(), answers(), st.integers(0, 2**32))
def test_damaged_answers_are_answers_or_upstream_errors(upstream: tuple[LoopThread, Server, int], good: Scripted,
                                                        damage: list[tuple[int, int, bytes, bool]], streamed: bool,
                                                        after: Scripted, seed: int) -> None:
    TRIED["upstream pool: damaged answers"] += 1
    lt, server, port = upstream
    # The server closes after a damaged answer: whatever the pool made of its bytes, none are
    # left to be read as the answer to the next request (what no client could tell apart).
    bad = Scripted(damaged(good.raw, damage), 0, (), b"", closes=True)
    first, second = exchange(lt, server, port, [bad, after], [streamed, False], seed, settle=True)
    if isinstance(first, UpstreamError):
        assert str(first) and "\n" not in str(first)
    assert second == after.expected()
