"""The console shows each site's maintenance as ``get sites`` does (Cordoned, Draining with
the replicas left, Drained), on the map and in the sites table, and says who took it out,
why and what a drain waits for in the site's tooltip.

The sites are served to the page through Playwright's routing, in the shape the API gives
them (``status.schedulable`` and ``status.maintenance``), so each state shows without agents
to drain; the rest of the API is a real control plane's.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

SINCE = "2026-01-15T04:00:00Z"
MAINTENANCE: dict[str, dict[str, Any]] = {
    "edge-cordoned": {"state": "Cordoned", "mode": "cordon", "reason": "disk swap", "by": "alice", "since": SINCE},
    "edge-draining": {"state": "Draining", "mode": "drain", "reason": "os upgrade", "by": "bob", "since": SINCE, "replicasLeft": 2,
                      "force": False, "waitingFor": ["d"],
                      "stuck": [{"deployment": "fr-only", "replicas": 1, "reason": "all 1 matching FR sites are draining"}]},
    "edge-drained": {"state": "Drained", "mode": "drain", "reason": "rack move", "by": "carol", "since": SINCE, "replicasLeft": 0,
                     "force": False},
}


def answers() -> dict[str, dict[str, Any]]:
    names = ["edge-open", *MAINTENANCE]
    sites = [{"metadata": {"name": name}, "spec": {"tier": "edge", "location": {"country": "FR", "region": "fr", "lat": 44 + i, "lon": 2.0}},
              "status": {"health": "Healthy", **({"schedulable": False, "maintenance": MAINTENANCE[name]} if name in MAINTENANCE else {})}}
             for i, name in enumerate(names)]
    deployments = [{"metadata": {"name": "d"}, "spec": {"model": "m", "placement": {"residency": ["EU"]}},
                    "status": {"phase": "Running", "replicas": 4, "readyReplicas": 4}}]
    placements = [{"deployment": "d", "site": "edge-open", "variant": "v", "replicas": 2},
                  {"deployment": "d", "site": "edge-draining", "variant": "v", "replicas": 2}]
    return {"/v1/sites": {"kind": "Site", "items": sites}, "/v1/modeldeployments": {"kind": "ModelDeployment", "items": deployments},
            "/v1/placements": {"items": placements}}


async def test_each_site_s_maintenance_shows_on_the_map_and_in_the_table(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    async def answer(route):  # type: ignore[no-untyped-def]
        path = "/" + route.request.url.split("/", 3)[3].split("?")[0]
        await route.fulfill(status=200, content_type="application/json", body=json.dumps(answers()[path]))

    f = harness.Fleet(tmp_path)
    try:
        cp = await f.start_control_plane()
        # the tooltip says when in the browser's zone, as the Events tab does
        context = await browser.new_context(locale="en-GB", timezone_id="Europe/Paris")
        page = await context.new_page()
        try:
            for path in ("/v1/sites", "/v1/modeldeployments", "/v1/placements"):
                await page.route(f"**{path}", answer)
            await page.goto(f"{cp.http_url}/ui/")
            await page.wait_for_function("() => document.querySelectorAll('#sites-body tr').length === 4", timeout=30_000)
            rows = {r.split("\t")[0]: r.split("\t")[4] for r in await page.locator("#sites-body tr").all_inner_texts()}
            assert rows == {"edge-open": "Schedulable", "edge-cordoned": "Cordoned", "edge-draining": "Draining (2 replicas left)",
                            "edge-drained": "Drained"}, rows
            scheduling = dict(await page.eval_on_selector_all("#map g.site", "els => els.map(e => [e.dataset.site, e.dataset.scheduling])"))
            assert scheduling == {"edge-open": "Schedulable", "edge-cordoned": "Cordoned", "edge-draining": "Draining",
                                  "edge-drained": "Drained"}, scheduling
            label = await page.locator("#map g.site[data-site=edge-draining] text.name").text_content()
            assert label == "edge-draining (2) · Draining", label
            tooltip = await page.locator("#map g.site[data-site=edge-draining] title").text_content() or ""
            assert "scheduling: Draining (2 replicas left), by bob since 15/01/2026 05:00:00 CET: os upgrade" in tooltip, tooltip
            assert "waiting for replacements of d to serve" in tooltip and "fr-only stays (1): all 1 matching FR sites are draining" in tooltip
            assert "scheduling" not in (await page.locator("#map g.site[data-site=edge-open] title").text_content() or "")
            await page.fill("#sites-filter", "cordoned")
            assert [r.split("\t")[0] for r in await page.locator("#sites-body tr").all_inner_texts()] == ["edge-cordoned"]
        finally:
            await context.close()
    finally:
        await f.stop()
