"""The residency chooser above the map follows the deployments as they change while the page
is open: each is named with its residency as it is now, and the one chosen stays chosen."""

from __future__ import annotations

import pathlib

import httpx
import pytest

from orchestrator.testing import harness, manifests

pytestmark = pytest.mark.asyncio(loop_scope="module")


def fleet_with_d_in(residency: list[str]) -> str:
    return manifests.bundle(
        manifests.edge_site("edge-paris", "FR", 48.85, 2.35, region="fr"),
        manifests.onnx_model("m", "m.onnx", "0" * 64),
        manifests.deployment("d", "m", 1, {"residency": residency, "tiers": ["edge"]}),
    )


async def apply(url: str, body: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        resp = await http.post("/v1/apply", content=body)
        assert resp.status_code == 200, resp.text


async def test_the_chooser_names_a_deployment_with_its_residency_as_it_is_now(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    fleet = harness.Fleet(tmp_path)
    page = await browser.new_page()
    try:
        cp = await fleet.start_control_plane()
        await apply(cp.http_url, fleet_with_d_in(["FR"]))
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector("#map path.zone[data-country=FR]", timeout=15_000)
        await page.select_option("#residency-of", "d")
        assert await page.locator("#residency-of option[value=d]").text_content() == "d (FR)"

        await apply(cp.http_url, fleet_with_d_in(["DE"]))  # by another operator, while the page is open
        await page.wait_for_function("() => document.querySelector('#residency-of option[value=d]').textContent === 'd (DE)'",
                                     timeout=15_000)
        assert await page.eval_on_selector("#residency-of", "s => s.value") == "d"
        assert await page.eval_on_selector_all("#map path.zone", "els => els.map(e => e.dataset.country)") == ["DE"]
    finally:
        await page.close()
        await fleet.stop()
