"""The console left open across a control-plane restart at the same address: request counts
stay "since the page opened".

The control planes run without agents; the gateway's request counter, the one /metrics
exports, stands in for requests it answered.
"""

from __future__ import annotations

import pathlib

import httpx
import pytest

from orchestrator.testing import harness, manifests

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITE = manifests.edge_site("edge-oslo", "NO", 59.91, 10.75, region="no")
RATE = "#map g.site[data-site=edge-oslo] text.rate"


async def apply(url: str, body: str, reason: str = "apply") -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        resp = await http.post("/v1/apply", content=body, headers={"x-edgeplane-reason": reason})
        assert resp.status_code == 200, resp.text


def port_of(cp: object) -> int:
    return int(cp.http_url.rsplit(":", 1)[1])  # type: ignore[attr-defined]


async def test_request_counts_start_when_the_page_opens_and_go_on_over_a_restart(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    first, second = harness.Fleet(tmp_path / "first"), harness.Fleet(tmp_path / "second")
    page = await browser.new_page()
    try:
        cp = await first.start_control_plane()
        await apply(cp.http_url, SITE)
        cp.gateway.metrics.requests.labels("intent", "edge-oslo", "200").inc(7)  # answered before the page opened
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector("#map g.site[data-site=edge-oslo]", timeout=10_000)
        cp.gateway.metrics.requests.labels("intent", "edge-oslo", "200").inc(3)
        await page.wait_for_function(f"() => document.querySelector('{RATE}').textContent.startsWith('3 req')", timeout=10_000)

        await first.stop()  # the new control plane's counters start from zero
        cp = await second.start_control_plane(port=port_of(cp))
        await apply(cp.http_url, SITE)
        cp.gateway.metrics.requests.labels("intent", "edge-oslo", "200").inc(2)
        await page.wait_for_function(f"() => document.querySelector('{RATE}')?.textContent.startsWith('5 req')", timeout=15_000)
    finally:
        await page.close()
        await second.stop()
        await first.stop()
