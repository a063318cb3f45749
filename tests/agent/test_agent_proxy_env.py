"""A host's proxy settings (``http_proxy``, ``https_proxy`` in /etc/environment, as a
corporate network sets them) are not read by edgeplane's gRPC connections: docs/deploy.md
names who reads them, and neither the agent nor the replica relay is among them. The gRPC
library read them on its own, and sent an agent's connection to its control plane, and a
control-plane replica's to its leader, to the proxy, loopback included."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
from collections.abc import AsyncIterator

import pytest

from orchestrator.testing import harness
from orchestrator.testing.postgres import PostgresServer


@contextlib.asynccontextmanager
async def refusing_proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[bytes]]:
    """A proxy every process started here is told of, as a corporate host tells them; yields
    what was asked of it (a CONNECT it cannot carry out: its network has no such host)."""
    asked: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.read(200))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        yield asked
    finally:
        server.close()


async def test_an_agent_joins_its_control_plane_directly_whatever_proxy_the_host_sets(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with refusing_proxy(monkeypatch) as asked:  # the agent inherits them
        fleet = harness.Fleet(tmp_path)
        try:
            cp = await fleet.start_control_plane()
            await fleet.start_agent("edge-lyon", country="FR", lat=45.76, lon=4.83)  # first join over TLS, then mutual TLS
            status = cp.hub.status("edge-lyon")
            assert status is not None and status.healthy
            assert asked == []
        finally:
            await fleet.stop()


async def test_a_replica_relays_its_agents_to_the_leader_directly_whatever_proxy_the_host_sets(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, postgres: PostgresServer) -> None:
    async with refusing_proxy(monkeypatch) as asked, \
            harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader = leading.cp
        assert leader is not None
        await following.start_agent("edge-lyon", country="FR", lat=45.76, lon=4.83)
        await harness.wait_until(lambda: (s := leader.hub.status("edge-lyon")) is not None and s.via is not None, 30,
                                 what="the agent relayed to the leader")
        assert asked == []
