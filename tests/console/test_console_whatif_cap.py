"""The what-if panel on a large fleet: the moves table stops at 50 rows, as ``edgeplane
simulate`` does, saying how many it leaves out, and the map draws the arrows of the rows
shown, not one per move of thousands.

The fleet (sites, deployment, placement) is generated, today's plan and the what-if's
report made by the simulation engine itself (as ``edgeplane simulate -f`` makes them) and
served to the page through Playwright's routing, so a fleet of hundreds of sites costs no
agents; the rest of the API is a real control plane's.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from orchestrator.cli import simulate as simulate_cli
from orchestrator.simulation import report, scenario, whatif
from orchestrator.testing import harness, manifests

pytestmark = pytest.mark.asyncio(loop_scope="module")

PER_COUNTRY = 100
SHOWN = 50  # what `edgeplane simulate` prints of a table


def fleet(root: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The API's answers for a fleet of 100 French and 100 German edge sites running 120
    replicas spread by site, and the report of a what-if that loses France."""
    where = {**{f"edge-fr-{i}": ("FR", 43 + (i % 10) * 0.5, -1 + (i // 10) * 0.6) for i in range(PER_COUNTRY)},
             **{f"edge-de-{i}": ("DE", 48 + (i % 10) * 0.4, 7 + (i // 10) * 0.5) for i in range(PER_COUNTRY)}}
    (root / "fleet.yaml").write_text(manifests.bundle(
        *(manifests.doc("Site", name, {"tier": "edge", "location": {"country": country, "lat": lat, "lon": lon}, "capacity": {"cpu": 4, "memoryGiB": 8}})
          for name, (country, lat, lon) in where.items()),
        manifests.onnx_model("intent", "intent.onnx", "0" * 64),
        manifests.deployment("intent-eu", "intent", 120, manifests.spread_by_site(residency=["EU"], tiers=["edge"])),
        # French callers' demand, which nothing serves once France is lost
        manifests.onnx_model("contracts", "contracts.onnx", "1" * 64),
        manifests.doc("ModelDeployment", "contracts-fr", {"model": "contracts", "replicas": {"min": 1, "max": 1},
                                                          "placement": {"residency": ["FR"]}, "demand": [{"lat": 48.8, "lon": 2.3, "rps": 30}]})))
    state = simulate_cli.local_state([str(root / "fleet.yaml")])
    spec = {"fail": {"countries": ["FR"]}}
    what = report.report(whatif.simulate(state, scenario.parse({"kind": "Scenario", "metadata": {"name": "console"}, "spec": spec})))
    sites = [{"metadata": {"name": name}, "spec": {"tier": "edge", "location": {"country": country, "lat": lat, "lon": lon}},
              "status": {"health": "Healthy"}} for name, (country, lat, lon) in where.items()]
    placed: dict[tuple[str, str, str], int] = {}
    for r in state.current:
        placed[(r.deployment, r.site, r.variant)] = placed.get((r.deployment, r.site, r.variant), 0) + 1
    answers = {
        "/v1/sites": {"kind": "Site", "items": sites},
        "/v1/modeldeployments": {"kind": "ModelDeployment", "items": [
            {"metadata": {"name": "intent-eu"}, "spec": {"model": "intent", "placement": {"residency": ["EU"]}},
             "status": {"phase": "Running", "replicas": 120, "readyReplicas": 120}}]},
        "/v1/placements": {"items": [{"deployment": d, "site": s, "variant": v, "replicas": n} for (d, s, v), n in placed.items()]},
    }
    return answers, what


async def test_the_what_if_table_and_its_arrows_stop_at_50_moves_saying_how_many_more(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    answers, what = fleet(tmp_path)
    moves = what["moves"]
    assert len(moves) > SHOWN + 5, f"the what-if moves only {len(moves)} replicas"

    async def answer(route):  # type: ignore[no-untyped-def]
        path = "/" + route.request.url.split("/", 3)[3].split("?")[0]
        body = what if path == "/v1/simulate" else answers[path]
        await route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    f = harness.Fleet(tmp_path)
    try:
        cp = await f.start_control_plane()
        page = await browser.new_page(viewport={"width": 1440, "height": 860})
        try:
            for path in (*answers, "/v1/simulate"):
                await page.route(f"**{path}", answer)
            await page.goto(f"{cp.http_url}/ui/")
            await page.wait_for_function(f"() => document.querySelectorAll('#map g.site').length === {2 * PER_COUNTRY}", timeout=30_000)
            await page.click("nav button[data-tab=whatif]")
            await page.select_option("#whatif-kind", "countries")
            await page.select_option("#whatif-target", "FR")
            await page.click("#whatif-run")
            await page.wait_for_selector("#whatif-summary", timeout=15_000)
            # the latency cards count unserved demand as slowest and say how much there is
            cards = await page.eval_on_selector_all("#whatif-summary .card", "els => els.map(e => [e.querySelector('span').textContent, e.querySelector('b').textContent])")
            assert ["unserved rps (today 0 of 30 (0%))", "30 of 30 (100%)"] in cards, cards
            assert ["p50, unserved as slowest (today 3.5 ms)", "unserved"] in cards, cards
            assert await page.locator("#whatif-moves tr").count() == 1 + SHOWN  # the header and 50 moves
            shown = await page.eval_on_selector_all("#whatif-moves tr td:first-child", "tds => tds.map(td => [...td.parentNode.children].map(c => c.textContent))")
            assert shown == [[m["deployment"], m["from"], m["to"], m["variant"]] for m in moves[:SHOWN]]
            assert await page.locator("#whatif-result h4").first.inner_text() == f"Moves ({len(moves)})"
            more = await page.locator("#whatif-moves-more").inner_text()
            assert more == f"... and {len(moves) - SHOWN} more (edgeplane simulate -o json for all)", more
            # the map draws the arrows of the rows shown: the table and the map agree
            arrows = await page.eval_on_selector_all("#map path.move", "els => els.map(e => [e.dataset.from, e.dataset.to])")
            assert arrows == [[m["from"], m["to"]] for m in moves[:SHOWN]]
        finally:
            await page.close()
    finally:
        await f.stop()
