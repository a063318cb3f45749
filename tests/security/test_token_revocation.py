"""A revoked or expired API token loses what it had opened as well as what it asks next:
the endpoint-table watch a standalone gateway keeps open ends at its next event."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from starlette.applications import Starlette

from orchestrator.api import auth
from orchestrator.api import watch as watch_api
from orchestrator.gateway import endpoints
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import loopback

HEARTBEAT_S = 0.1


@asynccontextmanager
async def watch_server(store: store_mod.Store, publisher: watch_api.TablePublisher | None = None,
                       authenticator: auth.Authenticator | None = None) -> AsyncIterator[str]:
    """The watch routes on loopback behind uvicorn, with auth on and quick heartbeats; yields the base URL.
    Without ``publisher``, that of a control plane after its first pass: the watch sends its snapshot at once."""
    if publisher is None:
        table = endpoints.EndpointTable()
        table.replace([])
        publisher = watch_api.TablePublisher(table)
    authenticator = authenticator or auth.Authenticator(store, required=True)
    app = Starlette(routes=watch_api.routes(authenticator, store, publisher, heartbeat_s=HEARTBEAT_S))
    try:
        async with loopback.serving(app) as port:
            yield f"http://127.0.0.1:{port}"
    finally:
        publisher.close()


async def events_until_the_end(lines: AsyncIterator[str], within_s: float) -> int:
    """How many events came before the stream ended; fails if it is still open after ``within_s``."""
    count = 0
    async with asyncio.timeout(within_s):
        async for _ in lines:
            count += 1
    return count


@pytest.mark.parametrize("how", ["revoked", "expired"])
async def test_the_watch_of_a_token_ends_once_it_is_revoked_or_expired(tmp_path: pathlib.Path, how: str) -> None:
    now = [1000.0]
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: now[0])
    secret, info = store.create_token("api", "read", 60, "admin", "standalone gateway")
    other, _ = store.create_token("api", "read", None, "admin", "another gateway")
    try:
        async with watch_server(store) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            async with http.stream("GET", "/v1/endpoints?watch=1", headers={"authorization": f"Bearer {secret}"}) as mine, \
                    http.stream("GET", "/v1/endpoints?watch=1", headers={"authorization": f"Bearer {other}"}) as theirs:
                assert mine.status_code == theirs.status_code == 200
                lines, kept = mine.aiter_lines(), theirs.aiter_lines()
                assert '"snapshot"' in await anext(lines) and '"snapshot"' in await anext(kept)
                assert '"heartbeat"' in await anext(lines)  # still valid: the watch goes on
                if how == "revoked":
                    store.revoke_token(info.id, "admin", "leaked in a CI log")
                else:
                    now[0] += 61
                assert await events_until_the_end(lines, 50 * HEARTBEAT_S) <= 1  # one heartbeat may have been on its way
                assert '"heartbeat"' in await anext(kept)  # another token's watch is untouched
            again = await http.get("/v1/endpoints", params={"watch": "1"}, headers={"authorization": f"Bearer {secret}"})
            assert again.status_code == 401
    finally:
        store.close()


async def test_a_token_revoked_while_its_watch_waits_for_the_first_table_is_never_sent_it(tmp_path: pathlib.Path) -> None:
    """A replica that has no table yet (a follower before it read the leader's) holds the
    snapshot back and sends heartbeats: a token revoked meanwhile ends the watch there, and
    the fleet's table, once it comes, goes to no one on that token."""
    store = store_mod.Store(tmp_path / "state.db")
    secret, info = store.create_token("api", "read", None, "admin", "standalone gateway")
    table = endpoints.EndpointTable()  # no table yet
    publisher = watch_api.TablePublisher(table)
    authenticator = auth.Authenticator(store, required=True)
    try:
        async with watch_server(store, publisher, authenticator) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            async with http.stream("GET", "/v1/endpoints?watch=1", headers={"authorization": f"Bearer {secret}"}) as mine:
                assert mine.status_code == 200
                lines = mine.aiter_lines()
                assert '"heartbeat"' in await anext(lines)
                store.revoke_token(info.id, "admin", "leaked in a CI log")
                authenticator.forget_tokens()  # as the replica that revokes it does
                table.replace([])  # the first table comes
                publisher.publish()
                rest: list[str] = []
                async with asyncio.timeout(50 * HEARTBEAT_S):
                    rest.extend([line async for line in lines])
                assert not any('"snapshot"' in line for line in rest), rest
    finally:
        store.close()
