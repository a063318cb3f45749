"""The console while the control plane answers badly or not at all: a request held and never
answered, a refusal that says when to ask again (in seconds or as an HTTP date, read as the
CLI reads it), the base map failing as the page opens. The page says what is wrong, asks
again no sooner than it is asked to, and recovers on its own once the control plane answers.

The faults are made with Playwright's routing in front of a real control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import math
import pathlib
import re
import time
from collections.abc import Callable

import httpx
import pytest
import pytest_asyncio

from edgeplane_proto import retry_after
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


async def asks_while_refused(browser, cp, status: int, headers: dict[str, str] | Callable[[], dict[str, str]],  # type: ignore[no-untyped-def]
                             asks: int):
    """The page open on `cp`, then /v1/sites refused with `status` and `headers` (or those
    `headers()` gives at each refusal) until it has been asked `asks` times: when each was
    asked (the loop's clock) and the header at the last."""
    loop = asyncio.get_running_loop()
    refusing, asked, enough = False, [], asyncio.Event()

    async def sites(route):  # type: ignore[no-untyped-def]
        if not refusing:
            await route.continue_()
            return
        asked.append(loop.time())
        if len(asked) >= asks:
            enough.set()
        await route.fulfill(status=status, content_type="application/json", headers=headers() if callable(headers) else headers,
                            body='{"error": "the store does not answer for now; retry"}')

    page = await browser.new_page()
    await page.route("**/v1/sites", sites)
    await page.goto(f"{cp.http_url}/ui/")
    await page.wait_for_selector(OSLO, timeout=15_000)
    refusing = True
    await asyncio.wait_for(enough.wait(), timeout=60)
    header = await page.inner_text("#server-state")
    refusing = False
    await page.wait_for_function(header_starts_with("live"), timeout=70_000)  # and it comes back on its own
    await page.close()
    return [b - a for a, b in zip(asked, asked[1:])], header


async def test_the_poll_waits_as_long_as_a_503_s_retry_after_asks(browser, cp) -> None:  # type: ignore[no-untyped-def]
    """The store does not answer and the API says to ask again in 4 s (longer than the first
    three waits would be): every page left open waits that long, instead of asking each second."""
    gaps, header = await asks_while_refused(browser, cp, 503, {"retry-after": "4"}, asks=3)
    assert all(gap >= 3.9 for gap in gaps), gaps
    # a wait is stretched by up to a fifth, so that the pages do not all ask again at once
    assert re.fullmatch(r"unreachable: 503: the store does not answer for now; retry · asking again in [45] s", header), header


async def test_the_poll_waits_as_long_as_a_503_s_retry_after_date_asks(browser, cp) -> None:  # type: ignore[no-untyped-def]
    """The same Retry-After as an HTTP date, 5 to 6 s ahead (a date has whole seconds), as a
    proxy or another server may give it: the page read it as none and asked again after 1 s,
    then 2 s, where the CLI and the Python client wait until then."""
    def headers() -> dict[str, str]:
        then = datetime.datetime.fromtimestamp(math.floor(time.time()) + 6, datetime.timezone.utc)
        return {"retry-after": email.utils.format_datetime(then, usegmt=True)}

    gaps, header = await asks_while_refused(browser, cp, 503, headers, asks=3)
    assert all(gap >= 4.9 for gap in gaps), gaps
    assert re.fullmatch(r"unreachable: 503: the store does not answer for now; retry · asking again in [5-7] s", header), header


RETRY_AFTERS = [
    "4", " 7 ", "0", "999999999999999999", "1234567890123456789", "1.5", "-1", "+5", "1e3", "0x10", "²", "", "Infinity",
    "Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994", "Sun Nov 06 08:49:37 1994",
    "sun nov  6 08:49:37 1994", "sun, 06 nov 1994 08:49:37 gmt", "Sun, 06 Nov 1994 09:49:37 +0100", "Sun, 06 Nov 1994 08:49:37 -0000",
    "Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 06 Nov 1994 08:49:37 EST", "Sun, 06 Nov 1994 08:49:37 XYZ", "Sun, 06 Nov 1994 08:49:37",
    "Sun, 31 Nov 1994 08:49:37 GMT", "Sun, 29 Feb 1995 08:49:37 GMT", "Sun, 29 Feb 1996 08:49:37 GMT", "Sun, 06 Nov 1994 24:00:00 GMT",
    "Sun, 06 Nov 1994 08:49:60 GMT", "Sat, 05 Nov 1994 08:49:37 GMT", "Fri, 01 Jan 2100 00:00:00 GMT", "Thu, 01 Jan 9999 00:00:00 GMT",
    "Sun, 06 Nov 10000 08:49:37 GMT", "Sun, 06 Nov 99999999999999999999 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 +99999999999999999",
    "Sun, 06 Nov 1994 08:49:37 +2400", "Sun, 06 Nov 1994 08:49:37 +2359", "Sunday, 06-Nov-70 08:49:37 GMT", "Sunday, 06-Nov-68 08:49:37 GMT",
    "Sun, 06 Nov 0094 08:49:37 GMT", "06 Nov 1994 08:49:37 GMT", "Sun, 6 Nov 1994 8:49:37 GMT", "Sun, 06 Nov 1994 08:49 GMT",
]


async def test_the_console_reads_a_retry_after_as_the_cli_and_the_python_client_do(browser, cp) -> None:  # type: ignore[no-untyped-def]
    """Each value, in seconds, as an HTTP date in each of its forms, or neither, gives the
    page the wait edgeplane_proto.retry_after gives the CLI (at the same moment), or none."""
    now = datetime.datetime(1994, 11, 6, 8, 49, tzinfo=datetime.timezone.utc)
    page = await browser.new_page()
    try:
        await page.goto(f"{cp.http_url}/ui/")
        read = await page.evaluate("""async ([values, nowMs]) => {
            const api = await import("./api.js");
            return values.map((v) => api.retryAfterSeconds(v, nowMs));
        }""", [RETRY_AFTERS, now.timestamp() * 1000])
    finally:
        await page.close()
    assert dict(zip(RETRY_AFTERS, read)) == {v: retry_after.seconds(v, now) for v in RETRY_AFTERS}


async def test_a_control_plane_that_keeps_failing_is_asked_less_and_less_often(browser, cp) -> None:  # type: ignore[no-untyped-def]
    """A proxy's 502 at each poll, with no Retry-After: each wait is twice the last."""
    gaps, header = await asks_while_refused(browser, cp, 502, {}, asks=4)
    assert [gap >= least for gap, least in zip(gaps, (0.9, 1.9, 3.9))] == [True] * 3, gaps
    assert re.fullmatch(r"unreachable: 502: .* · asking again in \d+ s", header), header


async def test_a_base_map_that_fails_to_load_as_the_page_opens_is_asked_again(browser, cp) -> None:  # type: ignore[no-untyped-def]
    """A proxy's 502 for the base map as the page opens (the control plane restarting just
    then): the tables are drawn meanwhile, the map pane says why it is empty, and the map
    with its sites follows once the base map loads."""
    failed: list[str] = []

    async def world(route):  # type: ignore[no-untyped-def]
        if len(failed) < 2:
            failed.append(route.request.url)
            await route.fulfill(status=502, content_type="text/html", body="<html>Bad Gateway</html>")
            return
        await route.continue_()

    page = await browser.new_page()
    try:
        await page.route("**/vendor/countries-110m.json", world)
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector("#sites-body tr >> text=edge-oslo", timeout=15_000)
        await page.wait_for_function("() => document.getElementById('map-state').textContent"
                                     ".startsWith('base map: 502: <html>Bad Gateway</html> · asking again in')", timeout=10_000)
        await page.wait_for_selector(OSLO, timeout=15_000)
        assert len(failed) == 2 and await page.locator("#map path.country").count() > 150
        assert await page.is_hidden("#map-state")
    finally:
        await page.close()
