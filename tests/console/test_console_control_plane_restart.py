"""The console left open across a control-plane restart at the same address: request counts
stay "since the page opened", and the Events tab follows the control plane that answers now,
even when its store numbers events from lower down (a wiped data dir, a restored backup).
A site's requests are counted whatever its name.

The gateway's request counter, the one /metrics exports, stands in for requests it answered.
"""

from __future__ import annotations

import asyncio
import pathlib

import httpx
import pytest

from orchestrator.testing import harness, manifests, onnx_models

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
    """A site's count is of the requests its replicas answered (a gateway keeps no series for
    a site it routes to no replica at), so edge-oslo serves one, through a restart of the
    control plane on the same addresses."""
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    fleet_yaml = manifests.bundle(SITE, manifests.onnx_model("intent", "intent.onnx", built.sha256), manifests.doc(
        "ModelDeployment", "intent-no", {"model": "intent", "replicas": {"min": 1, "max": 1}, "placement": {"tiers": ["edge"]}}))
    where = {"edge-oslo": dict(country="NO", region="no", lat=59.91, lon=10.75)}
    async with harness.serving_fleet(tmp_path, fleet_yaml, where, what="the replica in Oslo", ready=serving) as fleet:
        cp = fleet.cp
        assert cp is not None
        page = await browser.new_page()
        try:
            cp.gateway.metrics.requests.labels("intent", "edge-oslo", "200").inc(7)  # answered before the page opened
            await page.goto(f"{cp.http_url}/ui/")
            await page.wait_for_selector("#map g.site[data-site=edge-oslo]", timeout=10_000)
            cp.gateway.metrics.requests.labels("intent", "edge-oslo", "200").inc(3)
            await page.wait_for_function(f"() => document.querySelector('{RATE}').textContent.startsWith('3 req')", timeout=10_000)

            ports = dict(port=port_of(cp), agent_port=int(cp.agent_target.rsplit(":", 1)[1]),
                         agent_join_port=int(cp.agent_join_target.rsplit(":", 1)[1]) if cp.agent_join_target else 0)
            await cp.stop()  # the new control plane's counters start from zero
            cp = await fleet.start_control_plane(**ports)
            await harness.wait_until(lambda: serving(cp), 30, what="the replica in Oslo routed by the restarted control plane")
            cp.gateway.metrics.requests.labels("intent", "edge-oslo", "200").inc(2)
            await page.wait_for_function(f"() => document.querySelector('{RATE}')?.textContent.startsWith('5 req')", timeout=15_000)
        finally:
            await page.close()


def serving(cp) -> bool:  # type: ignore[no-untyped-def]
    return any(e.site == "edge-oslo" for e in cp.table.endpoints("intent"))


async def test_request_counts_add_up_the_replicas_that_answer_in_turn(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """Three replicas behind one Service, each counting its own gateway's requests, answer
    /metrics in turn: with no traffic the page counts nothing; what one replica counts next,
    and all that one started since the page opened counts, is added once."""
    fleet = harness.Fleet(tmp_path)
    counts = {"a": 100, "b": 40, "c": 70}
    uptime = {"a": 3600.0, "b": 3600.0, "c": 3600.0}
    served: list[str] = []
    polls: dict[int, asyncio.Event] = {}

    async def replicas_in_turn(route):  # type: ignore[no-untyped-def]
        replica = sorted(counts)[len(served) % len(counts)]
        served.append(replica)
        for n, event in polls.items():
            if len(served) >= n:
                event.set()
        body = f'edgeplane_gateway_requests_total{{code="200",model="intent",site="edge-oslo"}} {counts[replica]}.0\n'
        await route.fulfill(status=200, body=body, headers={
            "content-type": "text/plain", "x-edgeplane-replica": replica, "x-edgeplane-uptime": str(uptime[replica])})

    async def served_at_least(n: int) -> None:
        polls[n] = asyncio.Event()
        if len(served) >= n:
            return
        await asyncio.wait_for(polls[n].wait(), timeout=15)

    page = await browser.new_page()
    try:
        cp = await fleet.start_control_plane()
        await apply(cp.http_url, SITE)
        await page.route("**/metrics", replicas_in_turn)
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector("#map g.site[data-site=edge-oslo]", timeout=10_000)
        await served_at_least(7)  # each replica read twice or more, nothing answered meanwhile
        assert await page.text_content(RATE) == ""

        counts["b"] += 5
        await served_at_least(len(served) + 3)
        counts["d"], uptime["d"] = 2, 0.5  # a replica that started after the page opened (or restarted)
        await page.wait_for_function(f"() => document.querySelector('{RATE}').textContent.startsWith('7 req')", timeout=15_000)
        await served_at_least(len(served) + 6)
        assert (await page.text_content(RATE) or "").startswith("7 req")
    finally:
        await page.close()
        await fleet.stop()


async def test_a_site_named_as_an_object_property_counts_its_requests(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """`constructor` is a valid site name: its requests are counted as any other site's, not
    read as a property every JavaScript object has (which showed 0, and NaN in the sums)."""
    fleet = harness.Fleet(tmp_path)
    answered = {"n": 0}

    async def metrics(route):  # type: ignore[no-untyped-def]
        body = "".join(f'edgeplane_gateway_requests_total{{code="200",model="intent",site="{site}"}} {answered["n"]}.0\n'
                       for site in ("constructor", "edge-oslo"))
        await route.fulfill(status=200, body=body, headers={
            "content-type": "text/plain", "x-edgeplane-replica": "a", "x-edgeplane-uptime": "3600"})

    page = await browser.new_page()
    try:
        cp = await fleet.start_control_plane()
        await apply(cp.http_url, manifests.bundle(SITE, manifests.edge_site("constructor", "NO", 60.39, 5.32, region="no")))
        await page.route("**/metrics", metrics)
        await page.goto(f"{cp.http_url}/ui/")
        await page.wait_for_selector("#map g.site[data-site=constructor]", timeout=10_000)
        answered["n"] = 3  # each site's gateway answers 3 requests after the page opened
        for site in ("edge-oslo", "constructor"):
            await page.wait_for_function(
                f"() => document.querySelector('#map g.site[data-site={site}] text.rate').textContent.startsWith('3 req')", timeout=10_000)
        rows = {r.split("\t")[0]: r.split("\t")[7] for r in await page.locator("#sites-body tr").all_inner_texts()}
        assert rows["constructor"].startswith("3 (") and rows["edge-oslo"].startswith("3 ("), rows
    finally:
        await page.close()
        await fleet.stop()


async def open_on_40_events(browser, url: str):  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(40):  # each token created is an event
            assert (await http.post("/v1/tokens", json={"purpose": "bootstrap", "ttlSeconds": 60})).status_code == 201
    page = await browser.new_page()
    await page.goto(f"{url}/ui/")
    await page.click("nav button[data-tab=events]")
    await page.wait_for_function("() => Number(document.querySelector('#events-list li')?.dataset.id || 0) >= 40", timeout=10_000)
    return page


async def events_shown(page) -> list[int]:  # type: ignore[no-untyped-def]
    return await page.eval_on_selector_all("#events-list li", "els => els.map(e => Number(e.dataset.id))")


async def test_the_events_tab_follows_a_control_plane_restarted_on_a_fresh_store(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    first, second = harness.Fleet(tmp_path / "first"), harness.Fleet(tmp_path / "second")
    page = None
    try:
        cp = await first.start_control_plane()
        page = await open_on_40_events(browser, cp.http_url)
        await first.stop()
        cp = await second.start_control_plane(port=port_of(cp))
        await apply(cp.http_url, SITE, reason="after the restart")
        await page.wait_for_selector("#events-list li >> text=after the restart", timeout=15_000)
        assert max(await events_shown(page)) < 40  # the old store's events are gone from the list
    finally:
        if page is not None:
            await page.close()
        await second.stop()
        await first.stop()


async def test_the_events_tab_follows_a_store_swapped_between_two_polls(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """No poll fails (a restart quicker than the poll, a failover behind a proxy): the newest
    event, older than the last one shown, tells the page."""
    first, second = harness.Fleet(tmp_path / "first"), harness.Fleet(tmp_path / "second")
    page = None
    try:
        cp = await first.start_control_plane()
        restored = await second.start_control_plane()
        await apply(restored.http_url, SITE, reason="in the restored store")
        page = await open_on_40_events(browser, cp.http_url)

        async def from_the_restored_store(route):  # type: ignore[no-untyped-def]
            await route.fulfill(response=await route.fetch(url=route.request.url.replace(cp.http_url, restored.http_url)))

        await page.route("**/v1/events?*", from_the_restored_store)
        await page.wait_for_selector("#events-list li >> text=in the restored store", timeout=15_000)
        assert max(await events_shown(page)) < 40
        assert not (await page.inner_text("#server-state")).startswith("unreachable")
    finally:
        if page is not None:
            await page.close()
        await second.stop()
        await first.stop()


async def test_the_events_tab_follows_a_store_swapped_between_two_polls_whose_events_go_further(  # type: ignore[no-untyped-def]
        browser, tmp_path: pathlib.Path) -> None:
    """No poll fails, and the other store's newest event is past the last one shown, so event
    ids alone cannot tell: the store's identity does, and the list is read afresh from it,
    with none of the first store's events left in it."""
    first, second = harness.Fleet(tmp_path / "first"), harness.Fleet(tmp_path / "second")
    page = None
    try:
        cp = await first.start_control_plane()
        other = await second.start_control_plane()
        async with httpx.AsyncClient(base_url=other.http_url) as http:
            for _ in range(60):
                assert (await http.post("/v1/tokens", json={"purpose": "bootstrap", "ttlSeconds": 60})).status_code == 201
        await apply(other.http_url, SITE, reason="in the other store")
        async with httpx.AsyncClient(base_url=other.http_url) as http:
            items = (await http.get("/v1/events", params={"last": 100})).json()["items"]
        theirs = [f"{e['action']} {e['kind']}/{e['name']} by {e['actor']} — {e['reason']}" for e in items]
        page = await open_on_40_events(browser, cp.http_url)
        assert max(await events_shown(page)) < items[-1]["id"]  # ids alone cannot tell the stores apart

        async def from_the_other_store(route):  # type: ignore[no-untyped-def]
            await route.fulfill(response=await route.fetch(url=route.request.url.replace(cp.http_url, other.http_url)))

        await page.route("**/v1/events?*", from_the_other_store)
        await page.wait_for_selector("#events-list li >> text=in the other store", timeout=15_000)
        shown = await page.eval_on_selector_all("#events-list li span:not(.when)", "els => els.map(e => e.textContent)")
        assert shown == theirs[::-1]
    finally:
        if page is not None:
            await page.close()
        await second.stop()
        await first.stop()
