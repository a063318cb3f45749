"""The web console in headless Chromium against a live control plane and real agents.

Order matters within the module (one fleet): the what-if and live-traffic checks run
before an agent is killed. Every wait is on a condition in the page, bounded.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading

import httpx
import pytest

from orchestrator.api import simulate as simulate_api
from orchestrator.testing import harness

from .conftest import AGENTS

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}


async def open_console(browser, url: str):  # type: ignore[no-untyped-def]
    page = await browser.new_page(viewport={"width": 1440, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # the page runs under its Content-Security-Policy: anything it refuses is an error too
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    await page.goto(f"{url}/ui/")
    return page, errors


async def test_the_map_shows_every_site_with_health_replicas_and_residency(browser, fleet: harness.Fleet, screenshots: pathlib.Path) -> None:
    page, errors = await open_console(browser, fleet.cp.http_url)
    try:
        await page.wait_for_function(f"() => document.querySelectorAll('#map g.site[data-health=Healthy]').length === {len(AGENTS)}", timeout=15_000)
        names = await page.eval_on_selector_all("#map g.site", "els => els.map(e => e.dataset.site).sort()")
        assert names == sorted(AGENTS)
        # every replica placed is on the map: 3 of intent-eu + 1 of fields-fr
        await page.wait_for_function("() => [...document.querySelectorAll('#map g.site')].reduce((n, e) => n + Number(e.dataset.replicas), 0) === 4", timeout=15_000)
        assert await page.locator("#map path.country").count() > 150  # the offline base map
        # EU residency shades every EU country, and not Switzerland or Norway
        zones = set(await page.eval_on_selector_all("#map path.country.zone", "els => els.map(e => e.dataset.country)"))
        assert {"FR", "DE", "ES", "PL"} <= zones and not {"CH", "NO"} & zones
        await page.select_option("#residency-of", "fields-fr")
        zones = set(await page.eval_on_selector_all("#map path.country.zone", "els => els.map(e => e.dataset.country)"))
        assert zones == {"FR"}
        await page.select_option("#residency-of", "")
        tooltip = await page.locator("#map g.site[data-site=edge-paris] title").text_content()
        assert "health: Healthy" in (tooltip or "")
        await page.click("nav button[data-tab=deployments]")
        await page.wait_for_selector("#deployments-body tr[data-deployment=intent-eu]", timeout=10_000)
        await page.wait_for_function("() => document.querySelector('#deployments-body tr[data-deployment=intent-eu]').textContent.includes('Running')",
                                     timeout=10_000)
        # an autoscaled deployment whose replicas report no load yet: said so, not "undefined"
        await page.wait_for_function("() => document.querySelector('#deployments-body tr[data-deployment=fields-fr]').textContent"
                                     ".includes('1 replicas (')", timeout=10_000)
        assert "undefined" not in (await page.locator("#deployments-body").text_content() or "")
        await page.click("nav button[data-tab=events]")
        await page.wait_for_selector("#events-list li[data-action=replica-placed]", timeout=10_000)
        placed = await page.locator("#events-list li[data-action=replica-placed]").first.text_content()
        assert "by scheduler — " in (placed or ""), placed  # who did it, as in the audit log
        await page.click("nav button[data-tab=sites]")
        assert errors == []
    finally:
        await page.close()


async def test_the_events_tab_opens_on_the_newest_events(browser, fleet: harness.Fleet) -> None:
    """A long log: the page shows its newest events at once, not the oldest 200 first."""
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        for _ in range(210):  # each token created is an event, and changes nothing in the fleet
            assert (await http.post("/v1/tokens", json={"purpose": "bootstrap", "ttlSeconds": 60})).status_code == 201
        newest = (await http.get("/v1/events", params={"last": 1})).json()["items"][0]["id"]
    page, errors = await open_console(browser, fleet.cp.http_url)
    try:
        await page.click("nav button[data-tab=events]")
        # the list as the first poll left it (checked at every frame, so before the next poll)
        first = await page.wait_for_function("() => Number(document.querySelector('#events-list li')?.dataset.id || 0)", timeout=10_000)
        assert await first.json_value() >= newest
        assert errors == []
    finally:
        await page.close()


async def test_live_request_counts_come_from_the_gateway(browser, fleet: harness.Fleet, screenshots: pathlib.Path) -> None:
    page, errors = await open_console(browser, fleet.cp.http_url)
    try:
        await page.wait_for_selector("#map g.site[data-site=edge-madrid]", timeout=15_000)
        served: dict[str, int] = {}
        async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
            for _ in range(5):
                resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": "40.4,-3.7"})
                assert resp.status_code == 200, resp.text
                site = resp.headers["x-edgeplane-site"]
                served[site] = served.get(site, 0) + 1
        for site, n in served.items():
            await page.wait_for_function(
                f"() => (document.querySelector('#map g.site[data-site={site}] text.rate').textContent || '').startsWith('{n} req')", timeout=10_000)
        await page.screenshot(path=str(screenshots / "console.png"))
        assert errors == []
    finally:
        await page.close()


async def test_the_what_if_panel_shows_the_moves_on_the_map(browser, fleet: harness.Fleet, screenshots: pathlib.Path) -> None:
    busiest = max(AGENTS, key=lambda s: sum(r.replicas for r in fleet.cp.store.placements() if r.site == s))
    page, errors = await open_console(browser, fleet.cp.http_url)
    try:
        await page.wait_for_selector(f"#map g.site[data-site={busiest}]", timeout=15_000)
        await page.click("nav button[data-tab=whatif]")
        await page.select_option("#whatif-kind", "sites")
        await page.select_option("#whatif-target", busiest)
        async with page.expect_response("**/v1/simulate") as answered:
            await page.click("#whatif-run")
        report = await (await answered.value).json()
        await page.wait_for_selector("#whatif-moves tr:nth-child(2)", timeout=15_000)
        # how it was planned, as `edgeplane simulate` says it under its summary
        method = await page.locator("#whatif-method").inner_text()
        assert method.startswith({"repair": "planned by repair: ", "full": "planned in full: "}[report["method"]]), (report["method"], method)
        moves = await page.eval_on_selector_all("#map path.move", "els => els.map(e => [e.dataset.from, e.dataset.to])")
        assert moves and all(src == busiest and dst in AGENTS and dst != busiest for src, dst in moves)
        assert await page.get_attribute(f"#map g.site[data-site={busiest}]", "data-failed") == "true"
        summary = await page.locator("#whatif-summary").inner_text()
        assert "residency crossings" in summary
        await page.screenshot(path=str(screenshots / "console-whatif.png"))
        # the control plane changed nothing: the placement still has the site
        assert any(r.site == busiest for r in fleet.cp.store.placements())
        await page.click("#whatif-clear")
        assert await page.locator("#map path.move").count() == 0
        assert errors == []
    finally:
        await page.close()


async def test_a_what_if_waits_for_the_slot_another_caller_holds(browser, fleet: harness.Fleet,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two operators drilling at once: the console says it waits and shows the answer once
    the other what-if is over, as the 429's Retry-After asks, instead of an error."""
    monkeypatch.setattr(simulate_api.Busy, "retry_after_s", 1)
    cp = fleet.cp
    started, go_on = threading.Event(), threading.Event()

    def held(*args: object) -> dict:
        started.set()
        assert go_on.wait(30), "the test never let the other what-if finish"
        return simulate_api.run(*args)  # type: ignore[arg-type]

    cp.simulations.plan = held
    page, errors = await open_console(browser, cp.http_url)
    try:
        other = asyncio.create_task(asyncio.to_thread(httpx.post, f"{cp.http_url}/v1/simulate", content=b"", timeout=30))
        assert await asyncio.to_thread(started.wait, 30), "the other what-if never started"
        await page.wait_for_selector("#map g.site", timeout=15_000)
        await page.click("nav button[data-tab=whatif]")
        await page.select_option("#whatif-kind", "sites")
        await page.click("#whatif-run")
        waiting = await page.wait_for_selector("#whatif-waiting", timeout=15_000)
        assert (await waiting.inner_text()) == f"a simulation is already running on this control plane; retry in {simulate_api.RETRY_AFTER_S} s: waiting 1 s"
        cp.simulations.plan = simulate_api.run
        go_on.set()
        await page.wait_for_selector("#whatif-summary", timeout=15_000)
        assert (await other).status_code == 200
        assert await page.locator("#whatif-result .error").count() == 0
        await page.click("#whatif-clear")
        assert errors == []
    finally:
        go_on.set()
        cp.simulations.plan = simulate_api.run
        await page.close()


async def test_an_empty_scenario_reproduces_the_running_placement(fleet: harness.Fleet) -> None:
    """The simulation's inputs are the reconciler's: with no change, nothing moves."""
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        data = (await http.post("/v1/simulate", content=b"")).json()
    assert data["scenario"] == "no change"
    assert data["summary"] == {"moved": 0, "added": 0, "removed": 0, "unschedulableReplicas": 0, "residencyCrossings": 0}
    assert data["before"]["replicas"] == data["after"]["replicas"] == sum(r.replicas for r in fleet.cp.store.placements())
    assert data["before"]["latencyP95Ms"] is not None


async def test_a_killed_agent_turns_its_site_unhealthy_on_the_page(browser, fleet: harness.Fleet, screenshots: pathlib.Path) -> None:
    page, errors = await open_console(browser, fleet.cp.http_url)
    try:
        await page.wait_for_selector("#map g.site[data-site=edge-berlin][data-health=Healthy]", timeout=15_000)
        fleet.agents["edge-berlin"].kill()
        # 3 missed heartbeats of 0.5 s, a reconcile pass, and the page's 1 s poll
        await page.wait_for_selector("#map g.site[data-site=edge-berlin]:not([data-health=Healthy])", timeout=10_000)
        row = page.locator("#sites-body tr", has_text="edge-berlin")
        assert "Healthy" not in (await row.inner_text()).split("\t")[3]
        await page.screenshot(path=str(screenshots / "console-unhealthy.png"))
        assert errors == []
    finally:
        await page.close()
