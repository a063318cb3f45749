"""The control plane keeps an idle keep-alive connection longer than clients keep theirs.

httpx (and many clients) drop a pooled connection after 5 s idle; uvicorn's default closes
it after 5 s too, so a request sent on a pooled connection just as the server closed it was
lost to a reset (seen as ``httpx.ReadError`` in an end-to-end test). The server now keeps
idle connections for ``runloop.KEEP_ALIVE_S``.
"""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from orchestrator import runloop, server, server_config


async def test_an_idle_keep_alive_connection_outlives_the_clients_5_seconds(tmp_path: pathlib.Path) -> None:
    assert runloop.KEEP_ALIVE_S > 5
    cp = await server.ControlPlane(server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, insecure_agents=True)).start()
    try:
        host, port = cp.http_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await asyncio.wait_for(reader.readexactly(length), 10)
        # Idle past a client's 5 s: the server must not close (EOF) the connection meanwhile.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 6.5)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await cp.stop()
