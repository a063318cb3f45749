"""``capture.dailyCap`` holds for the day whatever happens to the control plane: a restart on
its data dir, or several replicas on one PostgreSQL store each capturing through its own
gateway. Each control plane here is a real one (its capture writer, its state store, its zone
files); its cascade runs on a loopback transport, as the other capture tests run it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from orchestrator import capture_counts, catalog, server
from orchestrator.distill import capture
from orchestrator.distill import store as capture_store
from orchestrator.gateway import cascade, endpoints, routing
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from orchestrator.testing.postgres import PostgresServer
from tests.cascade.transport import Transport
from tests.distill.test_capture import POLICY, ROUTE, capturing, ep

CAP = 3
ROUTE_CAPPED = dataclasses.replace(ROUTE, capture=dataclasses.replace(POLICY, daily_cap=CAP))
FLEET = [ep("edge-fr", "edge", "FR"), ep("dc-fr", "datacenter", "FR")]
NOW = 1_800_000_000.0  # one UTC day for every request


async def capture_through(cp: server.ControlPlane, n: int, wall: Callable[[], float] = lambda: NOW) -> None:
    """``n`` escalated requests through a cascade capturing into ``cp``'s writer, every one sampled,
    as a gateway that just started (its own sampler) captures them; then written."""
    table = endpoints.EndpointTable()
    table.replace(FLEET)
    table.cascades = {"m": ROUTE_CAPPED}
    handler = cascade.CascadeHandler(table, Transport({"http://edge-fr": "unsure", "http://dc-fr": "sure"}),  # type: ignore[arg-type]
                                     cascade.CascadeMetrics.create(CollectorRegistry()), capture=cp.capture_writer.offer,
                                     sampler=capture.Sampler(draw=lambda: 0.0), wall=wall)
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})

    async def plain() -> Any:
        raise AssertionError("cascade off is not asked for")
    for _ in range(n):
        assert (await handler.infer(ROUTE_CAPPED, "on", routing.Caller(), request, b'{"inputs": []}', plain)).status_code == 200
    await cp.capture_writer.flush()


def kept(cp: server.ControlPlane) -> int:
    return sum(cp.captures.zone(zone).count("dep") for zone in cp.captures.zones())


async def test_a_restart_does_not_reset_the_daily_cap(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        capturing(cp.store)  # deployment dep, whose records the retention purge then keeps
        await capture_through(cp, CAP + 2)
        assert kept(cp) == CAP
        await fleet.stop()
        cp = await fleet.start_control_plane()  # the same data dir and state store
        await capture_through(cp, CAP + 2)
        assert kept(cp) == CAP  # not CAP more for the same day: those before the restart were all it could keep
    finally:
        await fleet.stop()


async def test_replicas_on_one_postgresql_store_share_the_daily_cap(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        assert leading.cp is not None and following.cp is not None
        capturing(leading.cp.store)
        await asyncio.gather(capture_through(leading.cp, CAP + 1), capture_through(following.cp, CAP + 1))
        assert kept(leading.cp) + kept(following.cp) == CAP


async def test_records_whose_cap_the_state_store_cannot_count_are_lost_and_counted(tmp_path: pathlib.Path,
                                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """None can be shown to be within the cap: none is kept, and the loss is counted and logged once."""
    state = store_mod.Store(tmp_path / "state.db")
    state.close()  # every call now refused
    registry = CollectorRegistry()
    writer = capture_store.CaptureWriter(capture_store.ZoneStores(tmp_path / "captures"), registry,
                                         counts=capture_counts.StoreCounts(state))
    record = capture_store.Record("r1", "dep", "m", "EU", NOW, NOW + capture.DAY_S, "edge-fr", "large", 0.5, b"{}", None, b"{}", None)
    writer.start()
    with caplog.at_level("WARNING", logger=capture_store.__name__):
        assert writer.offer(record, CAP) and writer.offer(dataclasses.replace(record, id="r2"), CAP)
        await writer.flush()
    await writer.stop()
    assert (writer.failed, writer.captured) == (2, 0)
    assert registry.get_sample_value("edgeplane_capture_failed_total", {"zone": "EU"}) == 2
    [warned] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "zone EU" in warned and "daily cap cannot be counted" in warned
    writer.stores.close()


async def test_records_past_the_daily_cap_are_counted_in_metrics_by_zone(tmp_path: pathlib.Path) -> None:
    """The records a cap refused were counted in the writer's memory alone: /metrics showed
    the captures and none of the refusals, so a cap set too low read as a quiet cascade."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        capturing(cp.store)
        await capture_through(cp, CAP)
        await capture_through(cp, 2)  # as a second gateway, or this one restarted: its own count, the day's in the store
        [zone] = cp.captures.zones()
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            metrics = (await http.get("/metrics")).text
        assert f'edgeplane_capture_records_total{{zone="{zone}"}} {CAP}.0' in metrics
        assert f'edgeplane_capture_capped_total{{zone="{zone}"}} 2.0' in metrics, metrics
    finally:
        await fleet.stop()


async def test_get_cascades_says_what_a_cascade_captured_today_against_its_daily_cap(tmp_path: pathlib.Path) -> None:
    """The store counted the day's records, and /metrics the ones refused, but neither
    GET /v1/cascades nor edgeplane get cascades said so: an operator could not see that capture
    had stopped for the day, nor until when."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        capturing(cp.store, daily_cap=CAP)
        await harness.wait_until(lambda: "dep" in cp.table.cascades, 30, what="the cascade in the gateway's table")
        await capture_through(cp, CAP + 2, wall=cp.store.now)  # today, as the store tells days
        day = int(cp.store.now() // capture.DAY_S)
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            [item] = (await http.get("/v1/cascades")).json()["items"]
        assert item["capture"] == {
            "dailyCap": CAP, "day": catalog.rfc3339(day * capture.DAY_S)[:10], "resetsAt": catalog.rfc3339((day + 1) * capture.DAY_S),
            "zones": [{"zone": "EU", "captured": CAP, "left": 0, "capped": True}]}, item
        cli = [sys.executable, "-m", "orchestrator.cli.main", "get", "cascades", "--server", cp.http_url]
        out = await asyncio.to_thread(subprocess.run, [*cli, "-o", "json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["items"][0]["capture"] == item["capture"]
        table = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        head, row = table.stdout.splitlines()[:2]
        assert "CAPTURED TODAY" in head and row.rstrip().endswith(f"EU {CAP}/{CAP} capped"), table.stdout
        assert (f"dep: capture stopped for the day in EU (dailyCap {CAP} reached); it starts again at "
                f"{item['capture']['resetsAt']} (UTC midnight)") in table.stdout
    finally:
        await fleet.stop()


async def test_describe_says_what_a_cascade_deployment_captured_today_against_its_daily_cap(tmp_path: pathlib.Path) -> None:
    """edgeplane describe md showed a cascade deployment's figures but not the day's captures,
    which get cascades shows: describing the deployment did not tell that capture had stopped."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        capturing(cp.store, daily_cap=CAP)
        await harness.wait_until(lambda: "dep" in cp.table.cascades, 30, what="the cascade in the gateway's table")
        await capture_through(cp, CAP + 1, wall=cp.store.now)
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            [item] = (await http.get("/v1/cascades")).json()["items"]
        cli = [sys.executable, "-m", "orchestrator.cli.main", "describe", "md", "dep", "--server", cp.http_url]
        out = await asyncio.to_thread(subprocess.run, [*cli, "-o", "json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["cascade"]["capture"] == item["capture"]
        shown = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert f"Captured today: EU {CAP}/{CAP} capped\n" in shown.stdout, shown.stdout
        assert (f"dep: capture stopped for the day in EU (dailyCap {CAP} reached); it starts again at "
                f"{item['capture']['resetsAt']} (UTC midnight)") in shown.stdout
    finally:
        await fleet.stop()
