"""The console while the control plane answers badly or not at all: a request held and never
answered, a refusal that says when to ask again, the base map failing as the page opens.
The page says what is wrong, asks again no sooner than it is asked to, and recovers on its
own once the control plane answers.

The faults are made with Playwright's routing in front of a real control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

import httpx
import pytest
import pytest_asyncio

from orchestrator.testing import harness, manifests

pytestmark = pytest.mark.asyncio(loop_scope="module")

OSLO = "#map g.site[data-site=edge-oslo]"


def header_starts_with(prefix: str) -> str:
    return f"() => document.getElementById('server-state').textContent.startsWith({prefix!r})"


async def apply(url: str, body: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        resp = await http.post("/v1/apply", content=body)
        assert resp.status_code == 200, resp.text


@pytest_asyncio.fixture(loop_scope="module")
async def cp(tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        await apply(cp.http_url, manifests.edge_site("edge-oslo", "NO", 59.91, 10.75))
        yield cp
    finally:
        await fleet.stop()


async def test_a_request_never_answered_fails_the_poll_and_the_console_polls_on(browser, cp) -> None:  # type: ignore[no-untyped-def]
    """A control plane that takes a request and never answers it (hung, a proxy holding the
    connection): the poll gives up on it, the header says so instead of "live", and the page
    shows what changed once the control plane answers again."""
    from playwright.async_api import Error as PlaywrightError

    page = await browser.new_page()
    hang, held, release = False, asyncio.Event(), asyncio.Event()

    async def placements(route):  # type: ignore[no-untyped-def]
        if hang and not held.is_set():
            held.set()
            await release.wait()
        with contextlib.suppress(PlaywrightError):  # given up on by the page meanwhile
            await route.continue_()

    try:
        await page.route("**/v1/placements", placements)
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector(OSLO, timeout=15_000)
        hang = True
        await asyncio.wait_for(held.wait(), timeout=10)
        await apply(cp.http_url, manifests.edge_site("edge-bergen", "NO", 60.39, 5.32))
        await page.wait_for_function(header_starts_with("unreachable: no answer in 10 s"), timeout=20_000)
        await page.wait_for_selector("#map g.site[data-site=edge-bergen]", timeout=15_000)  # the next poll was answered
        await page.wait_for_function(header_starts_with("live"), timeout=5_000)
    finally:
        release.set()
        await page.close()
