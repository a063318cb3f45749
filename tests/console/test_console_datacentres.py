"""Data centres on the console: one whose first observation has not answered yet
(``Waiting``) is amber on the map, as a rejoining edge site is (held, not lost), and
counted so in the header; one out of reach says why in its tooltip and its health cell's, from its status's
``error``, as ``describe site`` does.

The sites are served to the page through Playwright's routing, in the shape the API gives
them, so each state shows without a cluster that hangs or refuses; the rest of the API is
a real control plane's.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from .conftest import console_page

pytestmark = pytest.mark.asyncio(loop_scope="module")

AMBER = "rgb(232, 163, 23)"  # console.css --wait
RED = "rgb(214, 69, 69)"  # console.css --bad
GREY = "rgb(107, 116, 128)"  # console.css --elsewhere
ERROR = ("RayService edge/serve: the Kubernetes API answered 401 Unauthorized: the kubeconfig's credential plugin "
         "exited 1 (aws eks get-token: <no credentials>)")


def sites() -> list[dict[str, Any]]:
    def dc(name: str, lat: float, status: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"tier": "datacenter", "location": {"country": "FR", "region": "fr", "lat": lat, "lon": 2.0}},
                "status": status}
    return [dc("dc-paris", 48.8, {"health": "Healthy"}), dc("dc-lyon", 45.7, {"health": "Waiting"}),
            dc("dc-lille", 50.6, {"health": "Unreachable", "error": ERROR})]


async def test_a_waiting_data_centre_is_amber_and_one_out_of_reach_says_why(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    async with console_page(browser, tmp_path, {"**/v1/sites": {"kind": "Site", "items": sites()}}) as (page, errors, cp):
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector("#map g.site[data-site=dc-lille]", timeout=30_000)
        fills = dict(await page.eval_on_selector_all("#map g.site", "els => els.map(e => [e.dataset.site, getComputedStyle(e.querySelector('circle')).fill])"))
        assert fills == {"dc-paris": "rgb(31, 157, 85)", "dc-lyon": AMBER, "dc-lille": RED}, fills
        assert "1 waiting" in await page.inner_text("#summary")
        tooltip = await page.locator("#map g.site[data-site=dc-lille] title").text_content() or ""
        assert f"health: Unreachable\nerror: {ERROR}\n" in tooltip, tooltip
        health = page.locator("#sites-body tr", has_text="dc-lille").locator("td").nth(3)  # the table says it too
        assert (await health.inner_text(), await health.get_attribute("title")) == ("Unreachable", ERROR)
        assert "error" not in (await page.locator("#map g.site[data-site=dc-paris] title").text_content() or "")
        assert errors == []


OWNED = ("RayService ns/edgeplane-dc-nice is owned by another edgeplane control plane (owner 53cea5e862184bd3; "
         "this one is 0141656e9c657306): nothing of site 'dc-nice' there is changed")


async def test_a_data_centre_another_control_plane_owns_is_grey_and_counted_apart(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """It answers, another control plane's: neither red (not out of reach; an operator's
    takeover, not an outage, ends it) nor amber (it does not pass on its own), and the header
    counts it apart; its cell and tooltip say whose it is."""
    owned = {"metadata": {"name": "dc-nice"}, "spec": {"tier": "datacenter", "location": {"country": "FR", "lat": 43.7, "lon": 7.3}},
             "status": {"health": "OwnedElsewhere", "error": OWNED, "ownedBy": "53cea5e862184bd3"}}
    async with console_page(browser, tmp_path, {"**/v1/sites": {"kind": "Site", "items": [*sites(), owned]}}) as (page, errors, cp):
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector("#map g.site[data-site=dc-nice]", timeout=30_000)
        fill = await page.eval_on_selector("#map g.site[data-site=dc-nice] circle", "e => getComputedStyle(e).fill")
        assert fill == GREY, fill
        assert "1 owned elsewhere" in await page.inner_text("#summary")
        tooltip = await page.locator("#map g.site[data-site=dc-nice] title").text_content() or ""
        assert "health: OwnedElsewhere\nowned by: 53cea5e862184bd3\n" in tooltip, tooltip
        health = page.locator("#sites-body tr", has_text="dc-nice").locator("td").nth(3)
        assert (await health.inner_text(), await health.get_attribute("title"), await health.get_attribute("class")) == (
            "OwnedElsewhere", OWNED, "elsewhere")
        assert errors == []
