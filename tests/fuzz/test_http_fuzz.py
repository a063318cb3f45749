"""The agent's HTTP/1.1 server fed byte streams it cannot choose: pipelines of valid requests
cut into reads anywhere, with the event loop turning any number of times between reads, and
the same pipelines damaged.

Each connection is driven as the event loop drives it (bytes put in the server's one read
buffer, ``buffer_updated``, the loop let run), so every cut and every interleaving of two
connections' reads is one Hypothesis can draw and shrink. A valid pipeline must be answered
by an echo of exactly each request, in order, whatever the cuts; a damaged one must be
answered by complete HTTP answers only, the last of them a 4xx refusal, with the
connection then closed, the same answers whatever the cuts (but for which of two faults
refuses a request that has both), and nothing left pending. A
last test sends the pipelines over real loopback sockets, several connections at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import httplistener, httpserver
from edge_agent.httpmessages import Request, Response
from edge_agent.httplistener import Limits
from edge_agent.httpserver import StreamingResponse

from .conftest import EXAMPLES, FUZZ, TRIED, LoopThread

LIMITS = Limits(max_body_bytes=2048, max_header_bytes=1024, max_pipelined=3)
READ_BUFFER = 256  # bytes a read takes at most here: bodies and heads span reads


async def echo(request: Request) -> Response | StreamingResponse:
    """What the request was, as JSON; ``/w…`` waits a turn of the loop first (an answer
    that is not eager), ``/s…`` streams its answer in two chunks."""
    if request.path.startswith("/w"):
        await asyncio.sleep(0)
    body = json.dumps({"method": request.method, "path": request.path, "query": request.query,
                       "headers": request.headers, "body": request.body.hex()}).encode()
    if request.path.startswith("/s"):
        async def chunks() -> AsyncIterator[bytes]:
            yield body[:7]
            await asyncio.sleep(0)
            yield body[7:]
        return StreamingResponse(200, chunks(), content_type="application/json")
    return Response(200, body)


# -- requests ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    chunked: tuple[int, ...] | None  # chunk sizes; None: Content-Length (or no body)
    expect_continue: bool

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", "Host: fuzz"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.expect_continue:
            lines.append("Expect: 100-continue")
        if self.chunked is not None:
            lines.append("Transfer-Encoding: chunked")
        elif self.body or self.method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(self.body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.chunked is None:
            return raw + self.body
        at = 0
        for i, size in enumerate(self.chunked):
            raw += f"{size:x}{';ext=' + str(i) if i % 2 else ''}\r\n".encode() + self.body[at:at + size] + b"\r\n"
            at += size
        return raw + b"0\r\nX-Trailer: t\r\n\r\n"

    def echoed(self) -> dict[str, Any]:
        """What ``echo`` answers for this request: the oracle, from the spec alone."""
        path, _, query = self.target.partition("?")
        headers = {"host": "fuzz"}
        for name, value in self.headers:
            headers[name.lower()] = value
        if self.expect_continue:
            headers["expect"] = "100-continue"
        if self.chunked is not None:
            headers["transfer-encoding"] = "chunked"
        elif self.body or self.method in ("POST", "PUT"):
            headers["content-length"] = str(len(self.body))
        return {"method": self.method, "path": urllib.parse.unquote(path), "query": query,
                "headers": headers, "body": self.body.hex()}


TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10)
SEGMENT = st.lists(st.one_of(st.text("abcxyz019-._~!$&'()*+,;=:@", min_size=1, max_size=4),
                             st.sampled_from(["%41", "%2F", "%20", "%C3%A9", "%ff", "%25", "%3F"])), max_size=4).map("".join)
FIELD = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=16).flatmap(
    lambda s: st.sampled_from([s, f"{s} {s}" if s else "v"]))


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    first = draw(st.sampled_from(["", "w", "s"]))
    segments = draw(st.lists(SEGMENT, max_size=4))
    target = "/" + first + "/".join(segments)
    if draw(st.booleans()):
        target += "?" + "&".join(f"{k}={v}" for k, v in draw(st.lists(st.tuples(TOKEN, TOKEN), max_size=3)))
    names = st.sampled_from(["x-a", "X-B", "x-long-name-" + "n" * 20, "accept", "user-agent"])
    headers = tuple(draw(st.lists(st.tuples(names, FIELD), max_size=4)))
    body = draw(st.binary(max_size=600)) if method in ("POST", "PUT", "PATCH") else b""
    chunked = None
    if body and draw(st.booleans()):
        sizes, left = [], len(body)
        while left:
            size = draw(st.integers(1, left))
            sizes.append(size)
            left -= size
        chunked = tuple(sizes)
    return Spec(method, target, headers, body, chunked, expect_continue=bool(body) and draw(st.booleans()))


# -- answers -------------------------------------------------------------------------------

def read_answers(out: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete answers in ``out`` (1xx left out) and what follows the last of them."""
    answers: list[tuple[int, bytes]] = []
    while b"\r\n\r\n" in out:
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if 100 <= int(status) < 200:
            out = rest  # an interim answer (100 Continue): no body
            continue
        if fields.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, sep, rest = rest.partition(b"\r\n")
                assert sep, "a chunked answer cut short"
                size = int(size_line, 16)
                if size == 0:
                    assert rest.startswith(b"\r\n"), rest[:20]
                    rest = rest[2:]
                    break
                body += rest[:size]
                assert rest[size:size + 2] == b"\r\n"
                rest = rest[size + 2:]
        else:
            length = int(fields["content-length"])
            assert len(rest) >= length, "an answer cut short"
            body, rest = rest[:length], rest[length:]
        answers.append((int(status), body))
        out = rest
    return answers, out


class Transport(asyncio.Transport):
    """A connection's transport that keeps what is written and hands the close back to the
    protocol on the loop's next turn, as asyncio's socket transports do."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closed = self.eof = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed and not self.eof, "written after the close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0  # what is written is taken at once

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def drive(server: httplistener.HttpServer, streams: list[bytes], schedule: random.Random) -> list[Transport]:
    """Feed each stream to a connection of its own, in reads of ``schedule``'s sizes,
    connections taking turns as ``schedule`` picks, the loop turning between reads."""
    conns = []
    for raw in streams:
        conn = httpserver._Connection(server)  # what asyncio makes for each accepted socket
        transport = Transport(conn)
        conn.connection_made(transport)
        conns.append((conn, transport, memoryview(raw)))
    left = list(range(len(conns)))
    for _ in range(100_000):  # bounded: every turn reads a byte or more, or lets the loop run
        if not left:
            break
        i = schedule.choice(left)
        conn, transport, rest = conns[i]
        if transport.closed or not rest:
            left.remove(i)
            continue
        if transport.reading:
            n = min(len(rest), schedule.randint(1, READ_BUFFER))
            server.read_buffer[:n] = rest[:n]
            conn.buffer_updated(n)
            conns[i] = (conn, transport, rest[n:])
        for _ in range(schedule.choice([0, 0, 1, 3])):
            await asyncio.sleep(0)
    else:
        pytest.fail("the streams were not read within 100,000 turns")
    for _ in range(1000):  # let the last answers out
        if all(conn.idle for conn, _, _ in conns):
            break
        await asyncio.sleep(0)
    for conn, transport, _ in conns:
        assert conn.idle, "a connection still answering after its stream ended"
        assert transport.closed or transport.reading, "reading paused with nothing left to answer"
        if not transport.closed:
            transport.close()  # the client hangs up
    await asyncio.sleep(0)
    assert not server.connections and server.pending == 0, (server.connections, server.pending)
    return [transport for _, transport, _ in conns]


def run(streams: list[bytes], seed: int, limits: Limits = LIMITS) -> list[bytes]:
    """Each stream's bytes written back, feeding it under the schedule ``seed`` draws."""
    errors: list[dict[str, Any]] = []

    async def main() -> list[bytes]:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        server = httplistener.HttpServer(echo, limits)
        transports = await drive(server, streams, random.Random(seed))
        return [bytes(t.out) for t in transports]

    out = asyncio.run(main())
    assert not errors, errors
    return out


# -- properties ----------------------------------------------------------------------------

@FUZZ
@given(st.lists(st.lists(specs(), min_size=1, max_size=5), min_size=1, max_size=3), st.integers(0, 2**32))
def test_valid_pipelines_are_echoed_in_order_however_they_are_cut(pipelines: list[list[Spec]], seed: int) -> None:
    TRIED["http: valid pipelines, cut anywhere"] += 1
    streams = [b"".join(spec.wire() for spec in specs) for specs in pipelines]
    for specs_, out in zip(pipelines, run(streams, seed)):
        answers, rest = read_answers(out)
        assert rest == b""
        assert [status for status, _ in answers] == [200] * len(specs_), answers
        assert [json.loads(body) for _, body in answers] == [spec.echoed() for spec in specs_]


JUNK = [b"\x00", b"\r", b"\n", b" ", b":", b"\r\n", b"\xff", b"0", b"-1", b"ffffffffffffffffff", b"fffff\r\n", b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n", b"x" * 1500]
HEADERS = [b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip, chunked\r\n", b"Content-Length: 9\r\n",
           b"Content-Length: 99999\r\n", b"Content-Length: -1\r\n", b"Connection: close\r\n", b"Expect: 100-continue\r\n",
           b"Upgrade: h2c\r\nConnection: upgrade\r\n", b" folded\r\n", b"x-big: " + b"y" * 1100 + b"\r\n"]
# (where, bytes cut there, bytes put there, whether "where" counts line ends: a header line added)
DAMAGE = st.lists(st.one_of(st.tuples(st.integers(0, 10**6), st.integers(0, 4), st.sampled_from(JUNK), st.just(False)),
                            st.tuples(st.integers(0, 100), st.just(0), st.sampled_from(HEADERS), st.just(True))),
                  min_size=1, max_size=4)


def damaged(raw: bytes, damage: list[tuple[int, int, bytes, bool]]) -> bytes:
    out = bytearray(raw)
    for at, cut, junk, at_line in damage:
        if at_line:
            ends = [i + 2 for i in range(len(out) - 1) if out[i:i + 2] == b"\r\n"] or [0]
            at = ends[at % len(ends)]
        else:
            at %= len(out) + 1
        out[at:at + cut] = junk
    return bytes(out)


@FUZZ
@given(st.lists(specs(), min_size=1, max_size=4), DAMAGE, st.integers(0, 2**32), st.integers(0, 2**32))
def test_damaged_pipelines_get_whole_answers_and_a_refusal(pipeline: list[Spec], damage: list[tuple[int, int, bytes, bool]],
                                                           seed: int, other_seed: int) -> None:
    TRIED["http: damaged pipelines"] += 1
    raw = damaged(b"".join(spec.wire() for spec in pipeline), damage)
    (out,) = run([raw], seed)
    answers, rest = read_answers(out)
    assert rest == b"", rest[:200]
    statuses = [status for status, _ in answers]
    assert all(s == 200 for s in statuses[:-1]), statuses
    if statuses and statuses[-1] != 200:
        assert 400 <= statuses[-1] < 500, answers[-1]
        error = json.loads(answers[-1][1])["error"]
        message = error["message"] if isinstance(error, dict) else error  # OpenAI's shape under /v1
        assert message and "\n" not in message, error
    # The same bytes cut otherwise, beside a valid pipeline on a second connection: the same
    # answers. A request wrong in two ways (a head too large that also holds a bad byte) may
    # be refused for either, as the parser reports a header only once the next one begins.
    valid = b"".join(spec.wire() for spec in pipeline)
    again, beside = run([raw, valid], other_seed)
    answers_again = read_answers(again)[0]
    assert [a for a in answers_again if a[0] == 200] == [a for a in answers if a[0] == 200]
    refused, refused_again = [s for s in statuses if s != 200], [s for s, _ in answers_again if s != 200]
    assert refused_again == refused or (refused and refused_again and {*refused, *refused_again} <= {400, 413, 431})
    assert [s for s, _ in read_answers(beside)[0]] == [200] * len(pipeline)


# -- real sockets --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served() -> Iterator[tuple[httplistener.HttpServer, int]]:
    lt = LoopThread("http-fuzz")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = httplistener.HttpServer(echo, Limits(max_body_bytes=2048, max_header_bytes=1024, max_pipelined=3))

    async def start() -> None:
        await server.start(sock)

    lt.run(start())
    try:
        yield server, sock.getsockname()[1]
    finally:
        lt.run(server.shutdown(5))
        lt.close()


def _read_all(sock: socket.socket, want: int) -> bytes:
    """Read until ``want`` complete answers arrived (or the server closed)."""
    out = b""
    for _ in range(10_000):
        if len(read_answers_lenient(out)) >= want:
            return out
        data = sock.recv(65536)
        if not data:
            return out
        out += data
    pytest.fail("no end to the answers")


def read_answers_lenient(out: bytes) -> list[tuple[int, bytes]]:
    try:
        return read_answers(out)[0]
    except (AssertionError, ValueError, KeyError):
        return []  # the last answer is still on its way


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))  # real sockets: 30 ms an example, where the cuts above take 10
@given(st.lists(st.lists(specs(), min_size=1, max_size=4), min_size=1, max_size=4), st.integers(0, 2**32))
def test_pipelines_on_concurrent_sockets(served: tuple[httplistener.HttpServer, int], pipelines: list[list[Spec]],
                                         seed: int) -> None:
    TRIED["http: pipelines on loopback sockets"] += 1
    _, port = served
    schedule = random.Random(seed)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in pipelines]
    try:
        rests = [memoryview(b"".join(spec.wire() for spec in specs)) for specs in pipelines]
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(100_000):
            left = [i for i, rest in enumerate(rests) if rest]
            if not left:
                break
            i = schedule.choice(left)
            n = min(len(rests[i]), schedule.randint(1, 700))
            socks[i].sendall(rests[i][:n])
            rests[i] = rests[i][n:]
        for s, specs_ in zip(socks, pipelines):
            answers = read_answers_lenient(_read_all(s, len(specs_)))
            assert [json.loads(body) for _, body in answers] == [spec.echoed() for spec in specs_]
    finally:
        for s in socks:
            s.close()
