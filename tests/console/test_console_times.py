"""The console says when in the browser's time zone, naming it, and with the date for any time
not today: the Events tab opens on the newest 200 events, which in a quiet fleet go back weeks.

/v1/events is served to the page through Playwright's routing, in the API's shape (``ts`` in
RFC 3339, UTC); the rest is a real control plane's.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import urllib.parse

import pytest

from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio(loop_scope="module")


def event(id: int, ts: str) -> dict[str, object]:
    return {"id": id, "ts": ts, "actor": "alice", "action": "cordon", "kind": "Site", "name": "edge-paris",
            "reason": "disk swap", "details": {}}


async def test_an_event_shows_its_date_unless_it_is_from_today(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    events = [event(7, "2026-01-15T04:00:00Z"), event(8, now)]

    async def answer(route):  # type: ignore[no-untyped-def]
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(route.request.url).query))
        items = [e for e in events if e["id"] > int(query["since"])] if "since" in query else events[-int(query["last"]):]
        await route.fulfill(status=200, content_type="application/json",
                            body=json.dumps({"items": items, "store": "s1", "prunedThrough": 0, "lastId": 8}))

    fleet = harness.Fleet(tmp_path)
    context = await browser.new_context(locale="en-GB", timezone_id="Asia/Tokyo")
    try:
        cp = await fleet.start_control_plane()
        page = await context.new_page()
        await page.route("**/v1/events?*", answer)
        await page.goto(f"{cp.http_url}/ui/")
        await page.click("nav button[data-tab=events]")
        await page.wait_for_selector("#events-list li[data-id='8']", timeout=15_000)
        assert await page.inner_text("#events-list li[data-id='7'] .when") == "15/01/2026 13:00:00 GMT+9"
        today = await page.inner_text("#events-list li[data-id='8'] .when")
        assert today.endswith(" GMT+9") and "/" not in today, today
    finally:
        await context.close()
        await fleet.stop()
