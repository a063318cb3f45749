"""``POST /v1/simulate`` on a real control plane is bounded: one what-if at a time (another
is answered 429 with Retry-After, never queued), each within a work budget counted before
any planning, and a scenario cannot be inflated with YAML aliases. The offline CLI
(``edgeplane simulate -f``) has no budget."""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from orchestrator import server_config, server_options
from orchestrator.api import simulate as simulate_api
from orchestrator.cli import http as http_mod

from . import fleets

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = pathlib.Path(__file__).resolve().parents[2]
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"
#: Small enough that adding 60 sites to the two of TWO_SITES is over it (62 × 40 units).
BUDGET = 2_000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory):
    async with fleets.two_sites_served(tmp_path_factory.mktemp("sim-limits"), simulation_budget=BUDGET) as cp:
        yield cp


def added(n: int, prefix: str = "new") -> str:
    rows = "".join(f"  - {{metadata: {{name: {prefix}-{i}}}, spec: {{tier: edge, location: {{country: FR, region: fr, "
                   f"lat: 45, lon: 4}}, capacity: {{cpu: 4, memoryGiB: 8}}}}}}\n" for i in range(n))
    return "addSites:\n" + rows


class Held:
    """What a simulation slot runs (``then``), held in its thread until the test lets it go on."""

    def __init__(self, then: Callable[..., dict[str, Any]] = simulate_api.run) -> None:
        self.then = then
        self.started, self.go_on = threading.Event(), threading.Event()

    def __call__(self, *args: Any) -> dict[str, Any]:
        self.started.set()
        assert self.go_on.wait(30), "the test never let the simulation finish"
        return self.then(*args)


async def test_a_second_simulation_while_one_runs_gets_429_with_retry_after(served) -> None:  # type: ignore[no-untyped-def]
    held = Held()
    served.simulations.plan = held
    try:
        async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/simulate", content="spec: {fail: {sites: [edge-a]}}"))
            assert await asyncio.to_thread(held.started.wait, 30), "the first simulation never started"
            second = await http.post("/v1/simulate", content="spec: {fail: {sites: [edge-b]}}")
            sweep = await http.post("/v1/simulate", params={"each": "site"})
            held.go_on.set()
            done = await first
            after = await http.post("/v1/simulate", content="spec: {fail: {sites: [edge-b]}}")  # the slot is free again
            metrics = (await http.get("/metrics")).text
    finally:
        held.go_on.set()
        served.simulations.plan = simulate_api.run
    for busy in (second, sweep):
        assert busy.status_code == 429, busy.text
        assert busy.headers["retry-after"] == str(simulate_api.RETRY_AFTER_S)
        assert busy.json() == {"error": f"a simulation is already running on this control plane; retry in {simulate_api.RETRY_AFTER_S} s",
                               "reason": "TooManyRequests"}
    assert done.status_code == 200 and done.json()["scenario"] == "fail site edge-a", done.text
    assert after.status_code == 200 and after.json()["scenario"] == "fail site edge-b", after.text
    assert 'edgeplane_simulations_refused_total{reason="busy"} 2.0' in metrics


async def test_two_slots_take_two_at_once_and_refuse_a_third() -> None:
    held = Held(then=lambda *args: {"ok": True})
    sims = simulate_api.Simulations(slots=2, plan=held)

    async def read() -> None:  # the held plan never looks at the state
        return None

    first = asyncio.create_task(sims.run(read, b"", None, None))  # type: ignore[arg-type]
    second = asyncio.create_task(sims.run(read, b"", None, None))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # both take a slot on their first step
    await asyncio.sleep(0)
    with pytest.raises(simulate_api.Busy):
        await sims.run(read, b"", None, None)  # type: ignore[arg-type]
    held.go_on.set()
    assert await first == await second == {"ok": True}
    assert await sims.run(read, b"", None, None) == {"ok": True}  # type: ignore[arg-type]


async def test_a_what_if_cancelled_while_the_state_is_read_holds_its_slot_until_the_read_ends() -> None:
    sims = simulate_api.Simulations(slots=1, plan=lambda *args: {"ok": True})
    started, go_on = asyncio.Event(), asyncio.Event()

    async def slow_read() -> None:  # the store read of a stalled database, say
        started.set()
        await go_on.wait()

    async def read() -> None:
        return None

    first = asyncio.create_task(sims.run(slow_read, b"", None, None))  # type: ignore[arg-type]
    await asyncio.wait_for(started.wait(), 5)
    first.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(simulate_api.Busy):  # its read still runs: a second would pile up on it
        await sims.run(read, b"", None, None)  # type: ignore[arg-type]
    go_on.set()
    await asyncio.sleep(0)  # the read ends, and its slot with it
    await asyncio.sleep(0)
    assert await sims.run(read, b"", None, None) == {"ok": True}  # type: ignore[arg-type]


async def test_a_what_if_over_the_budget_is_refused_before_planning_with_how_to_narrow_it(served) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as http:
        refused = await http.post("/v1/simulate", content=added(60))
        within = await http.post("/v1/simulate", content=added(10))
        metrics = (await http.get("/metrics")).text
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]
    assert set(refused.json()) == {"error", "reason"} and refused.json()["reason"] == "Invalid"
    assert message.startswith("this what-if is too large for the control plane: about 2,480 units of planning (62 sites × 0 deployments)")
    assert f"over its budget of {BUDGET:,} (edgeplane serve --simulate-budget)" in message
    assert "add fewer sites" in message and "sweep by region instead of site" in message
    assert within.status_code == 200 and within.json()["scenario"].endswith("add site new-9"), within.text
    assert 'edgeplane_simulations_refused_total{reason="budget"} 1.0' in metrics


async def test_aliases_cannot_inflate_a_scenario(served) -> None:  # type: ignore[no-untyped-def]
    site = ("{metadata: {name: twin}, spec: {tier: edge, location: {country: FR, region: fr, lat: 45, lon: 4}, "
            "capacity: {cpu: 4, memoryGiB: 8}}}")
    bomb = "addSites: [&s " + site + ", *s" * 100_000 + "]"  # 100,001 sites in 500 kB
    twins = "addSites: [&s " + site + ", *s" * 50 + "]"  # within every limit, but one site 51 times
    async with httpx.AsyncClient(base_url=served.http_url, timeout=60) as http:
        bombed = await http.post("/v1/simulate", content=bomb)
        twinned = await http.post("/v1/simulate", content=twins)
    assert bombed.status_code == 422, bombed.text
    assert bombed.json() == {"error": "<request>: more than 500,000 values once YAML aliases are expanded; "
                                      "a scenario adds at most 10,000 sites", "reason": "Invalid"}
    assert twinned.status_code == 422 and twinned.json() == {"error": "added site 'twin' is given twice", "reason": "Invalid"}, twinned.text


async def test_the_offline_cli_has_no_budget(served, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """What the control plane refuses as too large runs on the user's own machine."""
    fleet, drill = tmp_path / "fleet.yaml", tmp_path / "drill.yaml"
    fleet.write_text(fleets.TWO_SITES)
    drill.write_text(added(60))
    async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as http:
        assert (await http.post("/v1/simulate", content=drill.read_text())).status_code == 422
    proc = await asyncio.to_thread(subprocess.run, [str(EDGEPLANE), "simulate", "-f", str(fleet), "--scenario", str(drill), "-o", "json"],
                                   capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scenario"].endswith("add site new-59")


@pytest.mark.parametrize("argv, slots, units", [
    ([], 1, 300_000_000),
    (["--simulations", "2", "--simulate-budget", "1000000"], 2, 1_000_000),
])
async def test_serve_takes_the_limits_as_options(argv: list[str], slots: int, units: int) -> None:
    p = argparse.ArgumentParser()
    server_options.add_serve_arguments(p)
    config = server_config.config_from_args(p.parse_args(argv))
    assert (config.simulation_slots, config.simulation_budget) == (slots, units)


async def test_the_cli_waits_for_the_slot_another_caller_holds(served, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Two operators drilling at once: the second command says it waits, and answers once
    the first what-if is over, as the 429's Retry-After asks, instead of failing."""
    monkeypatch.setattr(simulate_api.Busy, "retry_after_s", 1)
    held = Held()
    served.simulations.plan = held
    try:
        first = asyncio.create_task(asyncio.to_thread(httpx.post, f"{served.http_url}/v1/simulate", content="spec: {fail: {sites: [edge-a]}}",
                                                      timeout=30))
        assert await asyncio.to_thread(held.started.wait, 30), "the first simulation never started"
        cli = await asyncio.create_subprocess_exec(str(EDGEPLANE), "--server", served.http_url, "simulate", "--fail-site", "edge-b", "-o", "json",
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
        assert cli.stderr is not None
        said = await asyncio.wait_for(cli.stderr.readline(), 60)
        assert said.decode().strip() == f"a simulation is already running on this control plane; retry in {simulate_api.RETRY_AFTER_S} s: waiting 1 s"
        held.go_on.set()
        out, _ = await asyncio.wait_for(cli.communicate(), 60)
        assert (await first).status_code == 200
    finally:
        held.go_on.set()
        served.simulations.plan = simulate_api.run
    assert cli.returncode == 0 and json.loads(out)["scenario"] == "fail site edge-b"


async def test_a_control_plane_that_never_answers_is_said_so_not_called_unreachable() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts, never answers
        api = http_mod.ApiClient(f"http://127.0.0.1:{silent.getsockname()[1]}", None, timeout=0.3)
        with pytest.raises(http_mod.CliError) as refused:
            api.request("POST", "/v1/simulate", json={})
    assert str(refused.value) == f"the control plane at {api.server} did not answer POST /v1/simulate within 0.3 s"
    assert refused.value.code == 3
