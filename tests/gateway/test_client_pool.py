"""The Python client's own connection pool full is the client's condition, not a replica's
nor a gateway's: a caller running more requests at once than the client has connections
(``max_connections``) gets :class:`~orchestrator.client.PoolFull`, saying so and how to give
it more, and every replica and gateway stays in rotation. Real loopback servers: one that
streams an answer holds the client's one connection while another request waits for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest

from orchestrator import client as client_mod

from .loopback import HANG_GUARD_S, streaming, v2_server

X = np.ones((1, 4), dtype=np.float32)
HI = [{"role": "user", "content": "hi"}]
TOKEN = b'data: {"choices": [{"index": 0, "delta": {"content": "hi!"}}]}\n\n'
TIMEOUT = 2.0  # what the waiting request waits for a connection: the client's timeout


def replica_cache(url: str) -> client_mod.EndpointCache:
    """A list with one replica that speaks OpenAI and v2 both (what each call asks of it is
    never sent: the pool is full before)."""
    cache = client_mod.EndpointCache()
    cache.store("m", {"ttlSeconds": 600, "endpoints": [
        {"site": "edge-a", "url": url, "inferUrl": f"{url}/v2/models/m/infer", "api": "openai"}]})
    return cache


@contextlib.contextmanager
def holding(client: client_mod.Client) -> Iterator[client_mod.Chat]:
    """A chat that has begun and is not read further: its connection stays busy."""
    chat = client.chat("m", HI)
    with chat:
        assert next(iter(chat)) == "hi!"
        yield chat


@contextlib.asynccontextmanager
async def aholding(client: client_mod.AsyncClient) -> AsyncIterator[client_mod.Chat]:
    chat = client.chat("m", HI)
    async with chat:
        assert await anext(aiter(chat)) == "hi!"
        yield chat


@pytest.mark.parametrize("call", ["infer", "chat", "lookup"])
@pytest.mark.parametrize("sync", [False, True], ids=["AsyncClient", "Client"])
async def test_a_full_pool_leaves_the_replica_in_rotation_and_says_how_to_grow_it(sync: bool, call: str) -> None:
    """One connection, busy with a chat: the next call waits for it the client's timeout and
    raises PoolFull, a TimedOut, naming max_connections; the replica, which answers, is not
    ejected (it was, and the gateway after it, and the caller read that neither answered).
    ``lookup``: another model's endpoint list, asked of the gateway, which is not ejected either."""
    async with streaming(TOKEN, every_s=0.02, most=1000) as replica, streaming(TOKEN, every_s=0.02, most=1000) as gateway:
        cache = replica_cache(replica.url)
        if sync:
            def run() -> None:
                with client_mod.Client(gateway.url, cache=cache, timeout=TIMEOUT, max_connections=1) as c, holding(c):
                    if call == "chat":
                        list(c.chat("m", HI))
                    else:
                        c.infer("m" if call == "infer" else "other", {"input": X})

            with pytest.raises(client_mod.PoolFull) as raised:
                await asyncio.to_thread(run)
        else:
            async with client_mod.AsyncClient(gateway.url, cache=cache, timeout=TIMEOUT, max_connections=1) as c, aholding(c):
                with pytest.raises(client_mod.PoolFull) as raised:
                    if call == "chat":
                        [t async for t in c.chat("m", HI)]
                    else:
                        await c.infer("m" if call == "infer" else "other", {"input": X})
        assert isinstance(raised.value, client_mod.TimedOut)
        assert "connections were all busy" in str(raised.value) and "max_connections" in str(raised.value), str(raised.value)
        assert cache.ejected() == frozenset()
        assert [e["url"] for e in cache.order("m")] == [replica.url]
        await asyncio.wait_for(replica.left.wait(), HANG_GUARD_S)  # the held chat closed with the client


@pytest.mark.parametrize("sync", [False, True], ids=["AsyncClient", "Client"])
async def test_a_full_pool_does_not_move_the_request_off_a_gateway(sync: bool) -> None:
    """Through the gateways (``direct=False``): the first gateway is not tried last for
    ``ejection_s`` because the client's own connections were busy."""
    async with streaming(TOKEN, every_s=0.02, most=1000) as first, streaming(TOKEN, every_s=0.02, most=1000) as second:
        if sync:
            def run() -> client_mod.EndpointCache:
                with client_mod.Client([first.url, second.url], direct=False, timeout=TIMEOUT, max_connections=1) as c, holding(c):
                    with pytest.raises(client_mod.PoolFull, match="max_connections"):
                        c.infer("m", {"input": X})
                    return c.cache

            cache = await asyncio.to_thread(run)
        else:
            async with client_mod.AsyncClient([first.url, second.url], direct=False, timeout=TIMEOUT, max_connections=1) as c, aholding(c):
                with pytest.raises(client_mod.PoolFull, match="max_connections"):
                    await c.infer("m", {"input": X})
                cache = c.cache
        assert cache.ejected() == frozenset()
        await asyncio.wait_for(first.left.wait(), HANG_GUARD_S)


async def test_max_connections_sizes_the_pool() -> None:
    """Two connections: an inference is answered while a chat holds one."""
    v2, v2_url = await v2_server("edge-v2")
    try:
        async with streaming(TOKEN, every_s=0.02, most=1000) as chatting:
            cache = client_mod.EndpointCache()
            cache.store("m", {"ttlSeconds": 600, "endpoints": [
                {"site": "edge-v2", "url": v2_url, "inferUrl": f"{v2_url}/v2/models/m/infer"},
                {"site": "edge-chat", "url": chatting.url, "inferUrl": f"{chatting.url}/v2/models/m/infer", "api": "openai"}]})
            async with client_mod.AsyncClient(chatting.url, cache=cache, timeout=TIMEOUT, max_connections=2) as c, aholding(c):
                result = await c.infer("m", {"input": X})
                assert result.site == "edge-v2" and np.array_equal(result["output"], X * 2)
            await asyncio.wait_for(chatting.left.wait(), HANG_GUARD_S)
    finally:
        await v2.shutdown(1)


async def test_a_full_pool_of_a_transport_given_says_the_transport_holds_it() -> None:
    """A transport the caller gave has its own pool, which max_connections does not size:
    PoolFull says so, and how to size that one."""
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    async with streaming(TOKEN, every_s=0.02, most=1000) as gateway:
        async with client_mod.AsyncClient(gateway.url, direct=False, timeout=TIMEOUT, transport=transport) as c, aholding(c):
            with pytest.raises(client_mod.PoolFull, match=r"transport given.*httpx\.Limits\(max_connections=N\)") as raised:
                await c.infer("m", {"input": X})
            assert raised.value.connections is None and c.cache.ejected() == frozenset()
        await asyncio.wait_for(gateway.left.wait(), HANG_GUARD_S)
    await transport.aclose()
