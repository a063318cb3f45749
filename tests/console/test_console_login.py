"""The console under token auth: a login form, the token kept in the tab, a bad one refused."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
import pytest_asyncio

from orchestrator.testing import harness, manifests

pytestmark = pytest.mark.asyncio(loop_scope="module")


SIGNED_OUT = "#login:not([hidden])"
SIGNED_IN = "#map g.site[data-site=edge-oslo]"  # the console drawn with the fleet's one site


async def open_signed_out(page, url: str) -> None:  # type: ignore[no-untyped-def]
    await page.goto(f"{url}/ui/")
    await page.wait_for_selector(SIGNED_OUT, timeout=10_000)


async def sign_in(page, token: str) -> None:  # type: ignore[no-untyped-def]
    await page.fill("#token", token)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector(SIGNED_IN, timeout=10_000)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded(tmp_path_factory: pytest.TempPathFactory):
    f = harness.Fleet(tmp_path_factory.mktemp("login"))
    try:
        cp = await f.start_control_plane(auth="token")
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {cp.admin_token}"}) as http:
            resp = await http.post("/v1/apply", content=manifests.edge_site("edge-oslo", "NO", 59.91, 10.75, region="no"))
            assert resp.status_code == 200, resp.text
        read, _ = cp.store.create_token("api", "read", None, "test", "console viewer")
        yield cp, read
    finally:
        await f.stop()


async def test_the_console_asks_for_a_token_and_keeps_it_in_the_tab(browser, guarded) -> None:  # type: ignore[no-untyped-def]
    cp, read = guarded
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await open_signed_out(page, cp.http_url)
        await page.fill("#token", "not-a-token")
        await page.click("#login button[type=submit]")
        await page.wait_for_function("() => document.getElementById('login-error').textContent.includes('unknown')", timeout=10_000)
        await sign_in(page, read)
        assert await page.evaluate("sessionStorage.getItem('edgeplane.token')") == read
        await page.reload()  # same tab: still signed in
        await page.wait_for_selector(SIGNED_IN, timeout=10_000)
        other = await context.new_page()  # another tab starts signed out
        await open_signed_out(other, cp.http_url)
        await page.click("#logout")
        await page.wait_for_selector(SIGNED_OUT, timeout=10_000)
        assert await page.evaluate("sessionStorage.getItem('edgeplane.token')") is None
    finally:
        await context.close()


async def test_a_pasted_token_is_cleaned_and_one_that_cannot_be_sent_is_refused(browser, guarded) -> None:  # type: ignore[no-untyped-def]
    """A token copied from a chat or a PDF brings invisible characters with it; one that still
    has a character no header can carry is refused on the form, and not kept in the tab."""
    cp, read = guarded
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await open_signed_out(page, cp.http_url)
        await sign_in(page, f"\ufeff {read[:5]}\u200b{read[5:]}\u00a0\n")
        assert await page.evaluate("sessionStorage.getItem('edgeplane.token')") == read

        await page.click("#logout")
        await page.fill("#token", f"{read[:5]}\u2192{read[5:]}")
        await page.click("#login button[type=submit]")
        error = await page.inner_text("#login-error")
        assert "U+2192" in error and "copy it again" in error, error
        assert await page.is_visible("#login") and await page.inner_text("#server-state") == "signed out"
        assert await page.evaluate("sessionStorage.getItem('edgeplane.token')") is None
        await page.reload()  # nothing kept: the form again, not an empty console
        await page.wait_for_selector(SIGNED_OUT, timeout=10_000)
    finally:
        await context.close()


async def test_signing_out_while_a_poll_is_asked_leaves_the_console_signed_out(browser, guarded) -> None:  # type: ignore[no-untyped-def]
    """The poll's answers arrive after the sign-out: they neither draw the console again
    nor start another poll."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    cp, read = guarded
    context = await browser.new_context()
    page = await context.new_page()
    asked, release = asyncio.Event(), asyncio.Event()
    held = False
    polls_after: list[str] = []

    async def placements(route):  # type: ignore[no-untyped-def]
        if held:
            asked.set()
            await release.wait()
        await route.continue_()

    async def sites(route):  # type: ignore[no-untyped-def]
        if release.is_set():
            polls_after.append(route.request.url)
        await route.continue_()

    try:
        await page.route("**/v1/placements", placements)
        await page.route("**/v1/sites", sites)
        await open_signed_out(page, cp.http_url)
        await sign_in(page, read)
        held = True
        await asyncio.wait_for(asked.wait(), timeout=10)
        await page.click("#logout")
        release.set()
        with pytest.raises(PlaywrightTimeout):  # a poll's render would follow its answers at once
            await page.wait_for_function("() => document.getElementById('server-state').textContent !== 'signed out'", timeout=2500)
        assert await page.is_visible("#login") and not await page.is_visible("#console")
        assert polls_after == []
    finally:
        release.set()
        await context.close()


async def test_a_what_if_still_running_at_sign_out_is_not_shown_after_the_next_sign_in(browser, guarded) -> None:  # type: ignore[no-untyped-def]
    """Its answer arrives after the sign-out: it is dropped, not drawn into the hidden panel
    for whoever signs in next; nor is a result shown before the sign-out kept for them."""
    from playwright.async_api import Error as PlaywrightError

    cp, read = guarded
    context = await browser.new_context()
    page = await context.new_page()
    asked, release = asyncio.Event(), asyncio.Event()
    held = False

    settled = asyncio.Event()

    def ended(request):  # type: ignore[no-untyped-def]
        if held and request.url.endswith("/v1/simulate"):
            settled.set()

    async def simulate(route):  # type: ignore[no-untyped-def]
        if held:
            asked.set()
            await release.wait()
        with contextlib.suppress(PlaywrightError):  # the page may have given up on it
            await route.continue_()

    try:
        await page.route("**/v1/simulate", simulate)
        page.on("requestfinished", ended)
        page.on("requestfailed", ended)
        await open_signed_out(page, cp.http_url)
        await sign_in(page, read)
        await page.click("nav button[data-tab=whatif]")
        await page.select_option("#whatif-kind", "sites")
        await page.select_option("#whatif-target", "edge-oslo")
        await page.click("#whatif-run")  # one answered before the sign-out
        await page.wait_for_selector("#whatif-summary", timeout=15_000)
        await page.click("#whatif-clear")
        held = True
        await page.click("#whatif-run")  # one still running at the sign-out
        await asyncio.wait_for(asked.wait(), timeout=10)
        await page.click("#logout")
        release.set()
        await asyncio.wait_for(settled.wait(), timeout=10)  # answered, or given up on by the page
        await sign_in(page, read)
        await page.click("nav button[data-tab=whatif]")
        assert await page.locator("#whatif-summary").count() == 0
        assert await page.inner_text("#whatif-result") == ""
    finally:
        release.set()
        await context.close()


async def test_a_401_from_a_proxy_in_front_shows_the_sign_in_form(browser, guarded) -> None:  # type: ignore[no-untyped-def]
    """A proxy in front of the control plane (its own sign-in gone stale) refuses with a page of
    its own, not the API's JSON: the console asks to sign in all the same."""
    cp, read = guarded
    context = await browser.new_context()
    page = await context.new_page()
    refused = False

    async def proxy(route):  # type: ignore[no-untyped-def]
        if refused:
            await route.fulfill(status=401, content_type="text/html", body="<html><body>Session expired</body></html>")
        else:
            await route.continue_()

    try:
        await page.route("**/v1/**", proxy)
        await open_signed_out(page, cp.http_url)
        await sign_in(page, read)
        refused = True
        await page.wait_for_selector(SIGNED_OUT, timeout=10_000)
        assert await page.inner_text("#login-error") == "unauthorized"
    finally:
        await context.close()
