"""Chats through the Python client against real loopback servers: a chat moves to the next
gateway or replica before its first token and keeps nothing of the failed attempt but its
time, it is one answer, its replicas, gateway and endpoint lookup share one timeout (which
keep-alives before the first token do not stretch), and the chat command ends a cut
answer's line before its one-line error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest

from edge_agent import httplistener, httpmessages
from orchestrator import client as client_mod
from orchestrator import clientchat

from .loopback import HANG_GUARD_S, answering, hanging, refused_url, streaming


async def test_a_chat_moves_to_the_next_gateway_before_its_first_token() -> None:
    failing, failing_url = await answering(502, {"error": {"message": "every replica tried failed"}})
    answer = {"choices": [{"message": {"role": "assistant", "content": "from the second gateway"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    good, good_url = await answering(200, answer)
    try:
        async with client_mod.AsyncClient([refused_url(), failing_url, good_url], direct=False, timeout=5) as c:
            chat = c.chat("m", [{"role": "user", "content": "hi"}], stream=False)
            assert [t async for t in chat] == ["from the second gateway"]
            assert chat.url == good_url and chat.attempts == 3
    finally:
        await failing.shutdown(1)
        await good.shutdown(1)


async def test_a_chat_replica_that_no_longer_serves_the_model_sends_the_chat_on() -> None:
    """The same for generative models: the client's direct path and the gateway's OpenAI route."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from orchestrator.gateway import endpoints, openai_routes, proxy, routing, upstream

    stale, stale_url = await answering(404, {"error": {"message": "model 'm' is not served here", "code": "model_not_found"}})
    answer = {"choices": [{"message": {"role": "assistant", "content": "from edge-b"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    good, good_url = await answering(200, answer)
    try:
        cache = client_mod.EndpointCache()
        cache.store("m", {"ttlSeconds": 600, "endpoints": [
            {"site": site, "url": url, "api": "openai"} for site, url in (("edge-moved", stale_url), ("edge-b", good_url))]})
        async with client_mod.AsyncClient("http://127.0.0.1:9", cache=cache, timeout=5) as c:
            chat = c.chat("m", [{"role": "user", "content": "hi"}], stream=False)
            assert [t async for t in chat] == ["from edge-b"] and chat.attempts == 2

        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("m", "m", "edge-moved", "edge", "FR", "fr", 48.85, 2.35, stale_url, api=routing.API_OPENAI),
                       routing.Endpoint("m", "m", "edge-b", "edge", "DE", "de", 52.52, 13.40, good_url, api=routing.API_OPENAI)])
        pool = upstream.UpstreamPool()
        registry = CollectorRegistry()
        gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
        app = Starlette(routes=openai_routes.OpenAIGateway(gateway, registry=registry).routes())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                                   headers={"x-edgeplane-location": "48.85,2.35"})
        await pool.close()
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "from edge-b", resp.text
        assert stale_url not in table.ejected()
    finally:
        await stale.shutdown(1)
        await good.shutdown(1)


async def test_the_chat_command_ends_a_cut_answer_s_line_before_its_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A replica that dies mid-answer: what arrived stays on stdout, ended by a newline, and
    the error is one line on stderr (no traceback)."""
    from orchestrator.cli import main as cli

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        if not head.startswith(b"POST /openai/v1/chat/completions"):  # the endpoint list: none known, use the gateway
            # this server closes every connection after one answer, so it says so; else the client
            # may send its next request on the pooled connection just as the close arrives
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                         b"connection: close\r\n\r\n{}")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                         b"connection: close\r\n\r\n")
            for text in ("Hel", "lo"):
                event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        writer.close()  # mid-answer: no [DONE], no last chunk

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        code = await asyncio.to_thread(cli.main, ["chat", "m", "hi", "--server", url])
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert code == 1 and out == "Hello\n", (out, err)
    assert err.startswith(f"error: the answer from {url} was cut after 5 characters: ") and len(err.strip().splitlines()) == 1, err


async def test_a_chat_is_one_answer_n_other_than_1_is_refused_and_other_choices_are_not_read() -> None:
    """A chat yields one text: ``n=2`` is refused before anything is sent (the engine would
    generate an answer no one reads), and events of any choice but the first, which an
    engine interleaves with it, are left out rather than spliced into its text."""
    def chunk(index: int, text: str) -> bytes:
        return b"data: " + json.dumps({"choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}).encode() + b"\n\n"

    stream = b"".join(chunk(i, t) for i, t in ((0, "Paris"), (1, "Lyon"), (0, " is"), (1, " is"), (0, " big."), (1, " small."))) + b"data: [DONE]\n\n"
    asked = []

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        asked.append(request.path)
        return httpmessages.Response(200, stream, headers=(("content-type", "text/event-stream"),))

    server, url = await _listening(handle)
    messages = [{"role": "user", "content": "a city?"}]
    try:
        async with client_mod.AsyncClient(url, direct=False) as c:
            for n in (2, 0, 1.0, True):
                with pytest.raises(ValueError, match="one answer"):
                    c.chat("m", messages, n=n)
            assert asked == []
            assert "".join([t async for t in c.chat("m", messages, n=1)]) == "Paris is big."
        with client_mod.Client(url, direct=False) as sc:
            with pytest.raises(ValueError, match="one answer"):
                sc.chat("m", messages, n=3)
    finally:
        await server.shutdown(1)


async def _listening(handle: Callable[[httpmessages.Request], Awaitable[httpmessages.Response]]) -> tuple[httplistener.HttpServer, str]:
    """A server answering with ``handle`` on a loopback port of its own, and its URL."""
    server = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def chats(heads: list[bytes]) -> list[bytes]:
    return [h for h in heads if h.startswith(b"POST ")]


async def test_a_chat_s_replicas_and_gateway_share_one_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """Replicas and the gateway that take the chat and never answer: each attempt had the
    whole timeout (``--timeout 1`` gave up after 3 s with two replicas, asking "is
    'edgeplane serve' running?"); the attempts share it: the first attempt spends it all, no
    other replica nor the gateway is asked, and the call gives up saying the answer did not
    come."""
    from orchestrator.cli import main as cli

    heads: list[bytes] = []
    messages = [{"role": "user", "content": "hi"}]
    async with hanging(heads=heads) as silent:
        replicas = [{"site": f"edge-{i}", "url": silent, "api": "openai"} for i in range(5)]
        async with hanging(json.dumps({"ttlSeconds": 600, "endpoints": replicas}).encode(), heads) as url:
            async with client_mod.AsyncClient(url, timeout=1) as c:
                started = time.monotonic()
                chat = c.chat("m", messages)
                with pytest.raises(client_mod.TimedOut, match=r"no answer within the timeout \(1 s"):
                    [t async for t in chat]
                assert time.monotonic() - started > 0.9  # not before its timeout
            assert len(chats(heads)) == 1, heads
            heads.clear()
            code = await asyncio.to_thread(cli.main, ["chat", "m", "hi", "--server", url, "--timeout", "1"])
            assert len(chats(heads)) == 1, heads
    err = capsys.readouterr().err
    assert code == 3, (code, err)
    assert err.startswith("error: no answer within the timeout (1 s") and "edgeplane serve" not in err, err


@pytest.mark.parametrize("make", [client_mod.Client, client_mod.AsyncClient])
async def test_a_chat_s_endpoint_lookup_is_part_of_its_one_timeout(make: type[client_mod.Client] | type[client_mod.AsyncClient]) -> None:
    """Three gateways that take the endpoint list's lookup and never answer it: each
    lookup had the client's whole timeout, so a chat with ``timeout=1`` gave up after 3 s;
    the lookup now has what is left of the chat's one timeout: the first gateway's lookup
    spends it, and no other gateway is asked."""
    heads: list[bytes] = []
    async with hanging(heads=heads) as a, hanging(heads=heads) as b, hanging(heads=heads) as c:
        def chat() -> None:
            with client_mod.Client([a, b, c], timeout=1) as client:
                list(client.chat("m", [{"role": "user", "content": "hi"}]))

        with pytest.raises(client_mod.TimedOut, match=r"no answer within the timeout \(1 s"):
            if make is client_mod.Client:
                await asyncio.to_thread(chat)
            else:
                async with client_mod.AsyncClient([a, b, c], timeout=1) as client:
                    [t async for t in client.chat("m", [{"role": "user", "content": "hi"}])]
    assert len(heads) == 1, heads  # not once per gateway


ROLE_DELTA = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]}\n\n'


@pytest.mark.parametrize("make", [client_mod.Client, client_mod.AsyncClient])
@pytest.mark.parametrize("keepalive", [b": ping\n\n", ROLE_DELTA], ids=["comment", "role-delta"])
async def test_keep_alives_before_the_first_token_do_not_stretch_a_chat_past_its_timeout(
        make: type[client_mod.Client] | type[client_mod.AsyncClient], keepalive: bytes) -> None:
    """A server that sends keep-alive comments or an empty role delta while its engine is
    stuck: each restarted the transport's read timeout, so a chat with ``timeout=1`` waited
    as long as they came (a minute here, then the stream ended with no answer); it raises
    TimedOut at its timeout, as a stream that sends nothing does."""
    messages = [{"role": "user", "content": "hi"}]
    async with streaming(keepalive, every_s=0.1, most=600) as stream:
        url = stream.url

        def chat() -> None:
            with client_mod.Client(url, direct=False, timeout=1) as client:
                list(client.chat("m", messages))

        started = time.monotonic()
        with pytest.raises(client_mod.TimedOut, match=r"no answer within the timeout \(1 s"):
            if make is client_mod.Client:
                await asyncio.to_thread(chat)
            else:
                async with client_mod.AsyncClient(url, direct=False, timeout=1) as client:
                    [t async for t in client.chat("m", messages)]
        assert time.monotonic() - started < 30  # half the keep-alives' minute: they did not stretch it


@pytest.mark.parametrize(("chunks", "lines"), [
    ([b"data: a\n\ndata: b\n\n"], ["data: a", "", "data: b", ""]),
    ([b"data: a\r\n\r\n"], ["data: a", ""]),
    ([b"data: a\r", b"\n", b"\r\n"], ["data: a", ""]),  # a CRLF split between two reads is one line end
    ([b"data: a\r", b"\n", b"\n"], ["data: a", ""]),
    ([b"data: a\r\rdata: b"], ["data: a", "", "data: b"]),  # CR alone ends a line; the last needs none
    ([b"da", b"ta: \xe2\x80", b"\xa8\n"], ["data: \u2028"]),  # a character split between reads; U+2028 ends no line
])
def test_an_event_stream_is_split_into_lines_as_the_sse_standard_says(chunks: list[bytes], lines: list[str]) -> None:
    assert list(clientchat.lines_of(chunks)) == lines


@pytest.mark.parametrize("chunks", [
    [b"data: " + b"a" * (3 << 20) + b"\n\n"],  # ended in the read it came in: one read of a gzip stream may hold MiBs
    [b"data: " + "\u00e9".encode() * (clientchat.MAX_LINE // 2) + b"\n"],  # fewer characters than the limit, more bytes
    [b"data: " + b"a" * (1 << 19), b"a" * (1 << 19), b"\n"],
])
def test_an_event_line_past_the_limit_is_refused_whether_or_not_it_ended(chunks: list[bytes]) -> None:
    with pytest.raises(clientchat.Retry, match="past"):
        list(clientchat.lines_of(chunks))


TOKEN = b'data: {"choices": [{"index": 0, "delta": {"content": "hi!"}, "finish_reason": null}]}\n\n'


@pytest.mark.parametrize("make", [client_mod.Client, client_mod.AsyncClient])
async def test_an_event_that_never_ends_is_cut_off_not_buffered(make: type[client_mod.Client] | type[client_mod.AsyncClient]) -> None:
    """A replica that streams one line with no line break (32 MiB of it here) was read
    until it stopped, all of it kept in memory: a line past the limit fails the attempt,
    so the chat moves on before its first token and is cut after it. (What was sent
    includes what the kernel's socket buffers took before the client left.)"""
    never_ends = b"a" * (1 << 16)
    async with (streaming(never_ends, opening=b"data: ", every_s=0, most=512) as before,
                streaming(never_ends, opening=TOKEN + b"data: ", every_s=0, most=512) as after,
                streaming(TOKEN + b"data: [DONE]\n\n", most=1) as gateway):
        cache = client_mod.EndpointCache()
        cache.store("m", {"ttlSeconds": 600, "endpoints": [{"site": "edge-a", "url": before.url, "api": "openai"}]})

        def moved_on() -> client_mod.Chat:
            with client_mod.Client(gateway.url, cache=cache, timeout=5) as client:
                answer = client.chat("m", [{"role": "user", "content": "hi"}])
                list(answer)
            return answer

        def cut() -> None:
            with client_mod.Client(after.url, direct=False, timeout=5) as client:
                list(client.chat("m", [{"role": "user", "content": "hi"}]))

        if make is client_mod.Client:
            answer = await asyncio.to_thread(moved_on)
            with pytest.raises(client_mod.StreamCut, match="cut after 3 characters: an event line past"):
                await asyncio.to_thread(cut)
        else:
            async with client_mod.AsyncClient(gateway.url, cache=cache, timeout=5) as aclient:
                answer = aclient.chat("m", [{"role": "user", "content": "hi"}])
                [t async for t in answer]
            with pytest.raises(client_mod.StreamCut, match="cut after 3 characters: an event line past"):
                async with client_mod.AsyncClient(after.url, direct=False, timeout=5) as aclient:
                    [t async for t in aclient.chat("m", [{"role": "user", "content": "hi"}])]
        assert answer.text == "hi!" and answer.attempts == 2 and before.url in cache.ejected()
        assert before.sent < 16 << 20 and after.sent < 16 << 20, (before.sent, after.sent)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("how", ["with", "close", "dropped"])
async def test_a_chat_read_in_part_can_be_closed_and_frees_its_connection(how: str) -> None:
    """An application that stops reading (``break``) and keeps the answer for its details
    held its connection, and the replica generated on, for as long as the answer lived:
    ``Chat`` had no close nor context manager, and its deltas referred back to it, so even
    a dropped one streamed on until a cycle collection. Each way of letting it go closes the
    connection now, while the client stays open, and what arrived stays readable."""
    async with streaming(TOKEN, every_s=0.02, most=500) as replica:
        with client_mod.Client(replica.url, direct=False, timeout=5) as client:
            def read_in_part() -> client_mod.Chat:
                answer = client.chat("m", HI)
                with answer if how == "with" else contextlib.nullcontext():
                    for _ in answer:
                        break
                if how == "close":
                    answer.close()
                return answer

            def drop() -> None:
                for _ in client.chat("m", HI):
                    break

            if how == "dropped":
                await asyncio.to_thread(drop)
            else:
                answer = await asyncio.to_thread(read_in_part)
                assert answer.text == "hi!" and answer.url == replica.url
            await asyncio.wait_for(replica.left.wait(), HANG_GUARD_S)


@pytest.mark.parametrize("how", ["async with", "aclose", "dropped"])
async def test_an_async_chat_read_in_part_can_be_closed_and_frees_its_connection(how: str) -> None:
    async with streaming(TOKEN, every_s=0.02, most=500) as replica:
        async with client_mod.AsyncClient(replica.url, direct=False, timeout=5) as client:
            if how == "dropped":
                async for _ in client.chat("m", HI):
                    break
            else:
                answer = client.chat("m", HI)
                async with answer if how == "async with" else contextlib.nullcontext():
                    async for _ in answer:
                        break
                if how == "aclose":
                    await answer.aclose()
                assert answer.text == "hi!" and answer.url == replica.url
            await asyncio.wait_for(replica.left.wait(), HANG_GUARD_S)


async def test_a_chat_that_moves_on_keeps_nothing_of_the_failed_attempt_but_its_time() -> None:
    """A replica that sent a finish and usage, then no text and no end: the answer the
    gateway gives has its own (none here), and its time to first token counts from the
    call, the failed attempt included, as the caller waited."""
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)
        event = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: %s\n\n" % event)
        await writer.drain()
        writer.close()

    replica = await asyncio.start_server(cut, "127.0.0.1", 0)
    replica_url = f"http://127.0.0.1:{replica.sockets[0].getsockname()[1]}"
    stream = b'data: {"choices": [{"index": 0, "delta": {"content": "hello"}}]}\n\ndata: [DONE]\n\n'

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        if request.path.startswith("/v1/endpoints/"):
            return httpmessages.Response(200, json.dumps({"ttlSeconds": 600, "endpoints": [
                {"site": "edge-cut", "url": replica_url, "api": "openai"}]}).encode())
        return httpmessages.Response(200, stream, headers=(("content-type", "text/event-stream"),))

    gateway, gateway_url = await _listening(handle)
    try:
        async with client_mod.AsyncClient(gateway_url) as c:
            chat = c.chat("m", [{"role": "user", "content": "hi"}])
            assert [t async for t in chat] == ["hello"] and chat.attempts == 2
        assert chat.finish_reason is None and chat.usage is None
        assert chat.ttft_s is not None and chat.ttft_s >= 0.3
    finally:
        replica.close()
        await gateway.shutdown(1)


async def test_a_chat_sends_the_token_only_to_a_replica_whose_entry_says_it_checks_tokens() -> None:
    """An agent run with --serve-auth none ("auth": "none") or listed by an earlier control
    plane (no "auth") is called without the client's token; one that checks ("token") with it."""
    stream = b'data: {"choices": [{"index": 0, "delta": {"content": "hello"}}]}\n\ndata: [DONE]\n\n'
    heads: list[dict[str, str]] = []

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        heads.append(request.headers)
        return httpmessages.Response(200, stream, headers=(("content-type", "text/event-stream"),))

    replica, url = await _listening(handle)
    try:
        for auth in ("none", None, "token"):
            cache = client_mod.EndpointCache()
            cache.store("m", {"ttlSeconds": 600, "endpoints": [
                {"site": "edge-a", "url": url, "api": "openai", **({"auth": auth} if auth else {})}]})
            async with client_mod.AsyncClient(refused_url(), cache=cache, token="ep_secret", timeout=5) as c:
                assert [t async for t in c.chat("m", [{"role": "user", "content": "hi"}])] == ["hello"]
    finally:
        await replica.shutdown(1)
    assert [h.get("authorization") for h in heads] == [None, None, "Bearer ep_secret"]
