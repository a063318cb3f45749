"""The console with a fleet of a thousand sites: a poll writes to the page only what changed.

The fleet's answers (sites, deployments, placements, in the API's shapes) are served to the
page through Playwright's routing, so a thousand sites cost no agents; the rest of the API
is a real control plane's.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest

from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITES = 1000


def fleet_answers(health_of: dict[str, str]) -> dict[str, dict]:
    sites = [{"metadata": {"name": f"edge-{i}"}, "spec": {"tier": "edge", "location": {
        "country": "FR", "region": "fr", "lat": 43 + (i % 50) * 0.1, "lon": -1 + (i // 50) * 0.3}},
        "status": {"health": health_of.get(f"edge-{i}", "Healthy")}} for i in range(SITES)]
    deployments = [{"metadata": {"name": f"d{j}"}, "spec": {"model": f"m{j}", "placement": {"residency": ["EU"]}},
                    "status": {"phase": "Running", "replicas": SITES // 10, "readyReplicas": SITES // 10}} for j in range(10)]
    placements = [{"deployment": f"d{i % 10}", "site": f"edge-{i}", "variant": "v", "replicas": 1} for i in range(SITES)]
    return {"/v1/sites": {"kind": "Site", "items": sites}, "/v1/modeldeployments": {"kind": "ModelDeployment", "items": deployments},
            "/v1/placements": {"items": placements}}


# Watches the map's sites and the sites table; window.readChanges() names the site of each
# change since the last read (or the element changed, outside any site).
WATCH = """() => {
  const siteOf = (record) => {
    const node = record.target.nodeType === Node.ELEMENT_NODE ? record.target : record.target.parentElement;
    const g = node.closest('g.site'), tr = node.closest('tr');
    return g ? g.dataset.site : tr ? tr.firstChild.textContent : node.id || node.nodeName;
  };
  let changes = [];
  const watch = new MutationObserver((records) => changes.push(...records.map(siteOf)));
  for (const node of [document.querySelector('#map g.sites'), document.getElementById('sites-body')])
    watch.observe(node, { subtree: true, childList: true, attributes: true, characterData: true });
  window.readChanges = () => { const read = [...changes, ...watch.takeRecords().map(siteOf)]; changes = []; return read; };
}"""


async def test_a_poll_rewrites_only_the_sites_that_changed(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    health: dict[str, str] = {}
    polls = 0
    polled = asyncio.Event()

    async def answer(route):  # type: ignore[no-untyped-def]
        nonlocal polls
        path = "/" + route.request.url.split("/", 3)[3].split("?")[0]
        if path == "/v1/sites":
            polls += 1
            polled.set()
        await route.fulfill(status=200, content_type="application/json", body=json.dumps(fleet_answers(health)[path]))

    async def polls_answered(n: int) -> None:
        """Returns once n more polls have asked for the sites: the page drew every poll before the last."""
        target = polls + n
        while polls < target:
            polled.clear()
            await asyncio.wait_for(polled.wait(), timeout=15)

    f = harness.Fleet(tmp_path)
    try:
        cp = await f.start_control_plane()
        page = await browser.new_page()
        try:
            for path in ("/v1/sites", "/v1/modeldeployments", "/v1/placements"):
                await page.route(f"**{path}", answer)
            await page.goto(f"{cp.http_url}/ui/")
            await page.wait_for_function(f"() => document.querySelectorAll('#map g.site').length === {SITES}", timeout=30_000)
            # the table shows the first rows and says how to find the others
            assert await page.locator("#sites-body tr").count() == 200
            assert await page.inner_text("#sites-more") == f"showing 200 of {SITES} sites: filter to find the others"
            await page.evaluate(WATCH)
            await polls_answered(3)
            assert await page.evaluate("window.readChanges()") == [], "a poll that changed nothing rewrote the page"

            health["edge-7"] = "Unhealthy"
            await page.wait_for_selector("#map g.site[data-site=edge-7][data-health=Unhealthy]", timeout=10_000)
            await polls_answered(2)
            changed = set(await page.evaluate("window.readChanges()"))
            assert changed and changed <= {"edge-7"}, changed  # the map's point and the table's row of that site, nothing else

            await page.fill("#sites-filter", "edge-777")
            assert await page.locator("#sites-body tr").all_inner_texts() == ["edge-777\tedge\tFR\tHealthy\tSchedulable\t1\tm7\t0"]
            assert await page.is_hidden("#sites-more")
        finally:
            await page.close()
    finally:
        await f.stop()
