"""The control API over real HTTP against a real in-process control plane."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import catalog, server, server_views
from orchestrator.api import paging
from orchestrator.manifests import loader
from orchestrator.store import sqlite as store_mod

from . import support
from .conftest import start_control_plane
from .support import doc


@pytest.fixture(scope="module")
def fleet(api: httpx.Client, offline_fleet: pathlib.Path) -> dict:
    """The example fleet applied once (data centres unreachable, edge sites without agents)."""
    body = loader.bundle([(p.name, p.read_text()) for p in sorted(offline_fleet.glob("*.yaml"))])
    r = api.post("/v1/apply", content=body, headers={"x-edgeplane-reason": "initial fleet"})
    assert r.status_code == 200, r.text
    return r.json()


def store_of(control_plane: support.ServerThread):  # type: ignore[no-untyped-def]
    assert control_plane.cp is not None
    return control_plane.cp.store


def names(api: httpx.Client, kind: str) -> list[str]:
    r = api.get(f"/v1/{kind}")
    assert r.status_code == 200, r.text
    return [o["metadata"]["name"] for o in r.json()["items"]]


def test_healthz(api: httpx.Client) -> None:
    r = api.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_apply_the_example_fleet_and_read_it_back(api: httpx.Client, fleet: dict) -> None:
    expected = support.example_names()
    assert not fleet["dryRun"]
    assert sorted((r["kind"], r["name"]) for r in fleet["results"]) == sorted((k, n) for k, ns in expected.items() for n in ns)
    assert {r["action"] for r in fleet["results"]} == {"created"}
    versions = [int(r["resourceVersion"]) for r in fleet["results"]]
    assert len(set(versions)) == len(versions)  # each write has its own version
    assert sorted(names(api, "sites")) == sorted(expected["Site"])
    assert sorted(names(api, "models")) == sorted(expected["Model"])
    assert sorted(names(api, "modeldeployments")) == sorted(expected["ModelDeployment"])
    assert names(api, "deployments") == names(api, "ModelDeployment") == names(api, "md")  # aliases

    paris = api.get("/v1/sites/dc-paris").json()
    assert paris["apiVersion"] == support.API_VERSION and paris["kind"] == "Site"
    assert paris["metadata"]["name"] == "dc-paris" and paris["metadata"]["generation"] == 1
    assert paris["metadata"]["labels"] == {"operator": "core", "zone": "eu-west"}
    assert paris["spec"]["location"] == {"country": "FR", "region": "eu-west", "lat": 48.8566, "lon": 2.3522}
    assert paris["spec"]["ray"]["address"] == support.UNREACHABLE_RAY

    events = api.get("/v1/events", params={"limit": 1000}).json()["items"]
    created = [(e["kind"], e["name"]) for e in events if e["action"] == "created" and e["reason"] == "initial fleet"]
    assert sorted(created) == sorted((r["kind"], r["name"]) for r in fleet["results"])
    assert all(e["actor"] == "anonymous" for e in events if e["reason"] == "initial fleet")


def test_apply_again_is_unchanged(api: httpx.Client, fleet: dict, offline_fleet: pathlib.Path,
                                  control_plane: support.ServerThread) -> None:
    before = store_of(control_plane).resource_version()
    body = loader.bundle([(p.name, p.read_text()) for p in sorted(offline_fleet.glob("*.yaml"))])
    r = api.post("/v1/apply", content=body)
    assert r.status_code == 200
    assert {x["action"] for x in r.json()["results"]} == {"unchanged"}
    assert store_of(control_plane).resource_version() == before


def test_get_unknown_things(api: httpx.Client) -> None:
    r = api.get("/v1/widgets")
    assert r.status_code == 404 and "unknown kind 'widgets'" in r.json()["error"]
    assert api.get("/v1/sites/no-such-site").status_code == 404
    assert api.delete("/v1/sites/no-such-site").status_code == 404


def test_dry_run_changes_nothing_and_returns_a_plan(api: httpx.Client, fleet: dict, control_plane: support.ServerThread) -> None:
    store = store_of(control_plane)
    before_version, before_events, before_objects = store.resource_version(), support.user_events(store), support.desired_state(store)
    new = doc("ModelDeployment", "doc-fields-es", {"model": "doc-fields", "variant": "distilled", "replicas": {"min": 1, "max": 1},
                                                   "placement": {"residency": ["ES"], "tiers": ["edge"]}})
    changed = api.get("/v1/modeldeployments/doc-fields-fr").json()
    changed_doc = doc("ModelDeployment", "doc-fields-fr", {**changed["spec"], "replicas": {"min": 2, "max": 3}})
    r = api.post("/v1/apply", params={"dryRun": "true"}, content=new + "---\n" + changed_doc)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dryRun"] is True
    assert [(x["name"], x["action"]) for x in body["results"]] == [("doc-fields-es", "created"), ("doc-fields-fr", "configured")]
    plan = body["plan"]
    assert {"changes", "deployments", "latency", "energy"} <= set(plan)
    planned = {d["name"]: d for d in plan["deployments"]}
    assert {"doc-fields-es", "doc-fields-fr", "intent-eu", "assistant"} <= set(planned)
    assert planned["doc-fields-fr"]["wanted"] >= 2
    for c in plan["changes"]:
        assert c["change"] in ("added", "removed", "moved in", "moved out", "unchanged")
        assert c["site"] in support.example_names()["Site"]
    assert store.resource_version() == before_version
    assert support.user_events(store) == before_events
    assert support.desired_state(store) == before_objects
    assert api.get("/v1/modeldeployments/doc-fields-es").status_code == 404


def test_a_dry_run_flag_that_cannot_be_read_applies_nothing(api: httpx.Client, fleet: dict, control_plane: support.ServerThread) -> None:
    """Fail closed: a dryRun value, or a parameter, the API does not know is refused, never
    taken for a real apply (``on``, ``t`` and a misspelt ``dry_run`` used to apply)."""
    store = store_of(control_plane)
    before = store.resource_version()
    new = doc("ModelDeployment", "doc-fields-es", {"model": "doc-fields", "variant": "distilled", "replicas": {"min": 1, "max": 1},
                                                   "placement": {"residency": ["ES"], "tiers": ["edge"]}})
    for params in ({"dryRun": "on"}, {"dryRun": "t"}, {"dryRun": ""}, {"dry_run": "true"}, {"dryRun": "true", "force": "1"}):
        r = api.post("/v1/apply", params=params, content=new)
        assert r.status_code == 400, (params, r.text)
        assert "dryRun" in r.json()["error"], r.text
    assert store.resource_version() == before
    assert api.get("/v1/modeldeployments/doc-fields-es").status_code == 404
    for value in ("1", "TRUE", "yes"):
        assert api.post("/v1/apply", params={"dryRun": value}, content=new).json()["dryRun"] is True
    assert api.post("/v1/delete", params={"ignoreNotFound": "maybe"}, content=new).status_code == 400
    assert store.resource_version() == before


def test_dry_run_of_a_bad_manifest_is_refused_too(api: httpx.Client) -> None:
    r = api.post("/v1/apply", params={"dryRun": "true"}, content=doc("Site", "x", {"tier": "edge"}))
    assert r.status_code == 422 and r.json()["issues"][0]["field"] == "spec.location"


def test_metrics_are_prometheus_text(api: httpx.Client, fleet: dict) -> None:
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("edgeplane_agents", "edgeplane_reconcile_passes", "edgeplane_replicas_placed", "edgeplane_endpoints"):
        assert name in families, sorted(families)
    agents = {s.labels["health"]: s.value for s in families["edgeplane_agents"].samples}
    assert agents == {"healthy": 0.0, "unhealthy": 0.0}  # no agent joined this control plane


def test_metrics_stay_prometheus_text_when_the_scraper_asks_for_openmetrics(api: httpx.Client) -> None:
    """Prometheus asks for OpenMetrics first; there the deprecated gauges and the counters that
    replace them (edgeplane_heartbeats_received and ..._total) would be one family twice, and
    the scrape would be refused whole."""
    r = api.get("/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                                               "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain;")
    samples = {s.name for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert {"edgeplane_heartbeats_received", "edgeplane_heartbeats_received_total"} <= samples


def test_a_scrape_while_the_store_fails_answers_without_the_placed_replicas(
        api: httpx.Client, fleet: dict, control_plane: support.ServerThread, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def scrape() -> dict:
        r = api.get("/metrics")
        assert r.status_code == 200, r.text[:300]
        return {f.name: f for f in text_string_to_metric_families(r.text)}

    assert "edgeplane_replicas_placed" in scrape()
    store = store_of(control_plane)

    def unreachable() -> list:
        raise store_mod.StoreError("cannot reach the PostgreSQL store at db: connection refused")

    monkeypatch.setattr(store, "placements", unreachable)
    with caplog.at_level(logging.INFO, logger=server.log.name):
        families = scrape()
        for name in ("edgeplane_agents", "edgeplane_reconcile_passes", "edgeplane_leader", "edgeplane_endpoints"):
            assert name in families, sorted(families)
        assert "edgeplane_replicas_placed" not in families  # no count from before the outage, read as current
        assert "edgeplane_sites_cordoned" not in families  # read with it: the store that fails one fails both
        assert "edgeplane_replicas_placed" not in scrape()
        monkeypatch.undo()
        assert "edgeplane_replicas_placed" in scrape()  # back with the store
    said = [r.getMessage() for r in caplog.records if r.name == server.log.name and r.getMessage().startswith("metrics:")]
    assert len(said) == 2 and "left out" in said[0] and "back" in said[1], said  # once an outage, not at every scrape


def test_a_scrape_on_a_stalled_store_waits_for_it_once(
        api: httpx.Client, control_plane: support.ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """What /metrics reads from the store is one read within METRICS_READ_S: on a stalled
    store a scrape waits out that limit once, not once per thing it reads (which it would
    show by starting a second read after the first gave up)."""
    store = store_of(control_plane)
    stalled = threading.Event()
    placements, listed = store.placements, store.list
    begun: list[str] = []

    def waiting(read: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            begun.append(read.__name__)
            stalled.wait(30)
            return read(*args, **kwargs)
        return call

    monkeypatch.setattr(server_views, "METRICS_READ_S", 1.0)
    monkeypatch.setattr(store, "placements", waiting(placements))
    monkeypatch.setattr(store, "list", waiting(listed))
    try:
        r = api.get("/metrics")
        asked = list(begun)
    finally:
        stalled.set()
    assert r.status_code == 200 and "edgeplane_agents" in r.text and "edgeplane_sites_cordoned" not in r.text, r.text[:300]
    assert len(asked) == 1, f"a scrape on a stalled store began {asked} one after the other"


def test_one_process_on_sqlite_always_leads(api: httpx.Client) -> None:
    view = api.get("/v1/controlplane").json()
    assert view["role"] == "leader" and view["leader"]["replica"] == view["replica"] and view["leader"]["fencingToken"] is None
    assert view["election"].startswith("none") and view["leaderChanges"] == 0
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    assert families["edgeplane_leader"].samples[0].value == 1
    assert families["edgeplane_leader_changes"].samples[0].value == 0


def test_placements_and_events_endpoints(api: httpx.Client, fleet: dict, control_plane: support.ServerThread) -> None:
    r = api.get("/v1/placements")
    assert r.status_code == 200
    for item in r.json()["items"]:
        assert item["site"] in support.example_names()["Site"] and item["replicas"] > 0
    all_events = api.get("/v1/events", params={"limit": 1000}).json()["items"]
    ids = [e["id"] for e in all_events]
    assert ids == sorted(ids)
    page = api.get("/v1/events", params={"since": ids[2], "limit": 2}).json()["items"]
    assert [e["id"] for e in page] == ids[3:5]
    only = api.get("/v1/events", params={"kind": "models", "limit": 1000}).json()["items"]
    assert only and {e["kind"] for e in only} == {"Model"}
    assert api.get("/v1/events", params={"since": "yesterday"}).status_code == 400
    newest = api.get("/v1/events", params={"last": 3}).json()["items"]  # the newest, oldest first
    assert [e["id"] for e in newest] == [e["id"] for e in api.get("/v1/events", params={"limit": 10_000}).json()["items"]][-3:]
    newest_models = api.get("/v1/events", params={"last": 1, "kind": "models"}).json()["items"]
    assert [e["id"] for e in newest_models] == [only[-1]["id"]]
    both = api.get("/v1/events", params={"last": 3, "since": ids[2]})
    assert both.status_code == 400 and "cannot be combined" in both.json()["error"]
    assert api.get("/v1/events", params={"last": -1}).status_code == 400
    assert api.get("/v1/events", params={"limit": 0}).status_code == 400
    for too_many in ({"limit": 10_001}, {"last": 10_001}):  # more than a page holds: refused, not cut to one silently
        refused = api.get("/v1/events", params=too_many)
        assert refused.status_code == 400 and "to 10,000, not '10001'" in refused.json()["error"], too_many
    # which store answered: the same for every page of it (its event ids count from its own start)
    assert {api.get("/v1/events", params=p).json()["store"] for p in ({"last": 1}, {"since": ids[2]})} == {control_plane.cp.store.store_id()}  # type: ignore[union-attr]


def test_events_at_one_site_and_a_sites_describe_name_the_replicas_that_came_and_went(
        api: httpx.Client, fleet: dict, control_plane: support.ServerThread) -> None:
    site = sorted(support.example_names()["Site"])[0]
    store_of(control_plane).record(
        store_mod.Event("scheduler", "replica-moved", "ModelDeployment", "intent-eu", f"site {site} lost its agent",
                        {"from": site, "to": "edge-elsewhere", "variant": "int8"}),
        store_mod.Event("scheduler", "replica-placed", "ModelDeployment", "intent-eu", "new", {"site": "edge-elsewhere", "variant": "int8"}))
    at_site = api.get("/v1/events", params={"site": site, "last": 1000}).json()["items"]
    assert at_site and all(e["name"] == site or site in (e["details"].get("site"), e["details"].get("from"), e["details"].get("to"))
                           for e in at_site)
    assert "replica-moved" in [e["action"] for e in at_site]  # (a data centre's own events may follow: it is unreachable)
    assert [e["action"] for e in api.get("/v1/events", params={"site": "edge-elsewhere", "last": 10}).json()["items"]] == [
        "replica-moved", "replica-placed"]
    described = api.get(f"/v1/sites/{site}", params={"describe": "true"}).json()
    assert "replica-moved" in [e["action"] for e in described["events"]]
    for bad in ("Edge_Lyon", "%", "a" * 64):
        refused = api.get("/v1/events", params={"site": bad})
        assert refused.status_code == 400 and refused.json()["parameter"] == "site", refused.text


def test_events_of_a_time_window(api: httpx.Client, fleet: dict) -> None:
    every = api.get("/v1/events", params={"last": 10_000}).json()["items"]
    first, last = every[0]["ts"], every[-1]["ts"]  # RFC 3339 in UTC, to the second

    def read(**params: Any) -> list[dict]:  # those logged by then: the control plane goes on logging (a data centre's errors)
        return [e for e in api.get("/v1/events", params=params).json()["items"] if e["id"] <= every[-1]["id"]]

    assert read(after=first, last=10_000) == every
    assert read(before=first) == []
    newest = read(after=last.replace("Z", "+00:00"), limit=10_000)
    assert newest and all(e["ts"] == last for e in newest)
    paris = last[:-1] + "+01:00"  # the same wall time an hour east is an hour earlier: every event is after it
    assert read(after=paris, last=10_000) == every
    for bad in ("03:12", "yesterday", "2026-12-07T03:12:00", "2026-13-07T03:12:00Z"):
        refused = api.get("/v1/events", params={"after": bad})
        assert refused.status_code == 400 and refused.json()["parameter"] == "after" and "RFC 3339" in refused.json()["error"], bad
    assert api.get("/v1/events", params={"before": "soon"}).json()["parameter"] == "before"


def test_describe_includes_events(api: httpx.Client, fleet: dict) -> None:
    r = api.get("/v1/modeldeployments/intent-eu", params={"describe": "true"})
    assert r.status_code == 200
    body = r.json()
    assert body["metadata"]["name"] == "intent-eu"
    assert [e["action"] for e in body["events"]][0] == "created"


# --- bad input: a clear 4xx, the server keeps running, the store is unchanged ----------------


@pytest.fixture
def unchanged(control_plane: support.ServerThread, api: httpx.Client) -> Iterator[None]:
    store = store_of(control_plane)
    before = (store.resource_version(), support.user_events(store), support.desired_state(store))
    yield
    assert (store.resource_version(), support.user_events(store), support.desired_state(store)) == before
    assert api.get("/healthz").status_code == 200


def test_ten_megabyte_body_is_413(api: httpx.Client, unchanged: None) -> None:
    body = (doc("Site", "big", support.edge_site_spec()) + "# " + "x" * 1000 + "\n") * 10_000
    assert len(body) > 10_000_000
    r = api.post("/v1/apply", content=body)
    assert r.status_code == 413 and "larger than 4 MiB" in r.json()["error"]


def test_ten_megabyte_chunked_body_is_413(api: httpx.Client, unchanged: None) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(160):
            yield b"#" + b"x" * 65_535

    r = api.post("/v1/apply", content=chunks())  # no Content-Length: the server counts as it reads
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {name: caf\xe9}\n", "not UTF-8"),
        (b"a: " + b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32 levels"),
        (b"spec: " + b"{a: " * 60 + b"1" + b"}" * 60, "nested deeper than 32 levels"),
        (b"kind: [unclosed\n", "malformed YAML"),
        (b'{"apiVersion": "edgeplane.io/v1alpha1", "kind": "Site",', "malformed YAML"),
        (b"apiVersion: edgeplane.io/v1alpha1\nkind: Gadget\nmetadata: {name: g}\nspec: {}\n", "unknown kind 'Gadget'"),
        (b"# only a comment\n", "no documents"),
        (b"", "no documents"),
    ],
    ids=["non-utf8", "nested-100k", "nested-60", "malformed-yaml", "truncated-json", "unknown-kind", "comment-only", "empty"],
)
def test_bad_bodies_are_422(api: httpx.Client, unchanged: None, body: bytes, message: str) -> None:
    r = api.post("/v1/apply", content=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert message in payload["error"] + " ".join(i["message"] for i in payload.get("issues", []))


@pytest.mark.parametrize("version", ["abc", "\u00b2", "9" * 5000], ids=["letters", "superscript-two", "5000-digits"])
@pytest.mark.parametrize("dry_run", ["false", "true"])
def test_non_numeric_resource_version_is_422(api: httpx.Client, fleet: dict, unchanged: None, version: str, dry_run: str) -> None:
    """Only what get returns is a version: digits a 64-bit integer holds ('²' is a digit to
    str.isdigit, and 5,000 digits are past what int() reads)."""
    text = doc("Site", "edge-lyon", support.edge_site_spec(), resourceVersion=version)
    r = api.post("/v1/apply", params={"dryRun": dry_run}, content=text)
    assert r.status_code == 422, r.text[:300]
    [issue] = r.json()["issues"]
    assert issue["field"] == "metadata.resourceVersion" and issue["line"] == support.line_of(text, "resourceVersion")


async def test_concurrent_conflicting_applies(control_plane: support.ServerThread) -> None:
    """Many clients update one object from the same resourceVersion: one wins per version."""
    store = store_of(control_plane)
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=60) as client:

        async def attempt(i: int, round_: int, version: str) -> tuple[int, int]:
            # every attempt differs from the current spec and from each other
            spec = {**support.edge_site_spec(), "capacity": {"cpu": 1 + i, "memoryGiB": 100 * round_ + i}}
            resp = await client.post("/v1/apply", content=doc("Site", "contended", spec, resourceVersion=version))
            return i, resp.status_code

        r = await client.post("/v1/apply", content=doc("Site", "contended", support.edge_site_spec()))
        assert r.status_code == 200
        for round_ in range(1, 4):
            current = (await client.get("/v1/sites/contended")).json()
            version, generation = current["metadata"]["resourceVersion"], current["metadata"]["generation"]
            events_before = len(support.user_events(store))
            outcomes = await asyncio.gather(*(attempt(i, round_, version) for i in range(12)))
            winners = [i for i, status in outcomes if status == 200]
            assert len(winners) == 1, outcomes
            assert sorted(status for _, status in outcomes) == [200] + [409] * 11
            after = (await client.get("/v1/sites/contended")).json()
            capacity = after["spec"]["capacity"]
            assert (capacity["cpu"], capacity["memoryGiB"]) == (1 + winners[0], 100 * round_ + winners[0])  # the winner's, whole
            assert after["metadata"]["generation"] == generation + 1
            assert int(after["metadata"]["resourceVersion"]) > int(version)
            new_events = support.user_events(store)[events_before:]
            assert [(e.action, e.name) for e in new_events if e.kind == "Site"] == [("configured", "contended")]
        refused = await client.post("/v1/apply", content=doc("Site", "contended", support.edge_site_spec(), resourceVersion=version))
        assert refused.status_code == 409 and "re-read and retry" in refused.json()["error"]


def test_a_delete_that_asks_to_keep_the_site_is_refused_and_deletes_nothing(api: httpx.Client) -> None:
    """Keeping the Site is POST /v1/sites/NAME/abandon-applications, a route an earlier release
    refuses; a DELETE with keepSite, or a misspelt flag, that went ahead would remove the very
    Site (and its applications) the caller asked to keep."""
    assert api.post("/v1/apply", content=doc("Site", "kept-site", support.edge_site_spec())).status_code == 200
    for params in ({"keepSite": "true"}, {"keepSite": "true", "abandonApplications": "true"}, {"abandonApplication": "true"}):
        r = api.delete("/v1/sites/kept-site", params=params)
        assert r.status_code == 400, (params, r.text)
    said = api.delete("/v1/sites/kept-site", params={"keepSite": "true", "abandonApplications": "true"}).json()["error"]
    assert "POST /v1/sites/kept-site/abandon-applications" in said, said
    # the route that keeps it: an edge Site leaves no applications elsewhere, so nothing to give up
    kept = api.post("/v1/sites/kept-site/abandon-applications")
    assert kept.status_code == 404 and "left elsewhere is pending" in kept.json()["error"], kept.text
    assert api.post("/v1/sites/kept-site/abandon-applications", params={"keepSite": "true"}).status_code == 400
    assert api.post("/v1/models/kept-site/abandon-applications").status_code == 400
    assert api.get("/v1/sites/kept-site").status_code == 200
    assert api.delete("/v1/sites/kept-site", params={"abandonApplications": "false"}).status_code == 200
    assert api.get("/v1/sites/kept-site").status_code == 404


def test_delete(api: httpx.Client, control_plane: support.ServerThread) -> None:
    model = doc("Model", "tmp-model", support.model_spec())
    dep = doc("ModelDeployment", "tmp-dep", support.deployment_spec("tmp-model"))
    assert api.post("/v1/apply", content=model + "---\n" + dep).status_code == 200
    r = api.delete("/v1/models/tmp-model")
    assert r.status_code == 409 and "tmp-dep" in r.json()["error"]
    assert api.get("/v1/models/tmp-model").status_code == 200
    assert api.delete("/v1/modeldeployments/tmp-dep").status_code == 200
    assert api.delete("/v1/models/tmp-model").status_code == 200
    assert api.get("/v1/models/tmp-model").status_code == 404
    assert api.delete("/v1/models/tmp-model").status_code == 404
    deleted = [(e.kind, e.name, e.actor) for e in store_of(control_plane).events(limit=100_000) if e.action == "deleted"]
    assert ("ModelDeployment", "tmp-dep", "anonymous") in deleted and ("Model", "tmp-model", "anonymous") in deleted
    # a deployment naming a model that is now gone is refused
    r = api.post("/v1/apply", content=dep)
    assert r.status_code == 422 and r.json()["issues"][0]["field"] == "spec.model"


def test_stale_resource_version_is_409_and_current_one_applies(api: httpx.Client) -> None:
    assert api.post("/v1/apply", content=doc("Site", "versioned", support.edge_site_spec())).status_code == 200
    rv = api.get("/v1/sites/versioned").json()["metadata"]["resourceVersion"]
    spec = {**support.edge_site_spec(), "energy": {"carbonGramsPerKWh": 99}}
    assert api.post("/v1/apply", content=doc("Site", "versioned", spec, resourceVersion=rv)).status_code == 200
    stale = api.post("/v1/apply", content=doc("Site", "versioned", support.edge_site_spec(), resourceVersion=rv))
    assert stale.status_code == 409
    assert api.get("/v1/sites/versioned").json()["spec"]["energy"]["carbonGramsPerKWh"] == 99


# --- authentication -------------------------------------------------------------------------


def test_token_auth_roles(secured: support.ServerThread) -> None:
    assert secured.cp is not None and secured.cp.admin_token
    admin = {"authorization": f"Bearer {secured.cp.admin_token}"}
    token_file = secured.config.data_dir / "admin.token"
    assert token_file.read_text().strip() == secured.cp.admin_token
    assert token_file.stat().st_mode & 0o077 == 0  # only the owner may read it
    site = doc("Site", "edge-a", support.edge_site_spec())
    with httpx.Client(base_url=secured.url, timeout=30) as c:
        r = c.get("/v1/sites")
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
        assert c.post("/v1/apply", content=site).status_code == 401
        assert c.get("/v1/sites", headers={"authorization": "Bearer nonsense"}).status_code == 401
        assert c.get("/healthz").status_code == 200  # probes need no token

        r = c.post("/v1/tokens", json={"purpose": "api", "role": "read", "description": "dashboards"}, headers=admin)
        assert r.status_code == 201, r.text
        read = {"authorization": f"Bearer {r.json()['token']}"}
        read_id = r.json()["id"]
        assert c.get("/v1/sites", headers=read).status_code == 200
        r = c.post("/v1/apply", content=site, headers=read)
        assert r.status_code == 403 and "'read'" in r.json()["error"]
        assert c.post("/v1/tokens", json={"purpose": "api", "role": "admin"}, headers=read).status_code == 403
        assert c.delete("/v1/sites/edge-a", headers=read).status_code == 403
        assert c.get("/v1/sites/edge-a", headers=admin).status_code == 404  # the refused apply applied nothing

        r = c.post("/v1/apply", content=site, headers=admin)
        assert r.status_code == 200
        assert c.get("/v1/sites/edge-a", headers=read).json()["metadata"]["name"] == "edge-a"
        actors = {e["actor"] for e in c.get("/v1/events", headers=read, params={"kind": "sites"}).json()["items"]}
        assert any(a.startswith("token:") and "initial admin token" in a for a in actors), actors

        # a bootstrap token is not an API token
        boot = c.post("/v1/tokens", json={"purpose": "bootstrap"}, headers=admin).json()
        assert boot["role"] == "agent" and boot["expiresAt"] is not None
        assert c.get("/v1/sites", headers={"authorization": f"Bearer {boot['token']}"}).status_code == 401

        assert c.post(f"/v1/revoke/tokens/{read_id}", headers=admin).json() == {"revoked": True}
        assert c.get("/v1/sites", headers=read).status_code == 401

        for bad in ({"purpose": "root"}, {"purpose": "api", "role": "god"}, {"purpose": "api", "role": "read", "ttlSeconds": -1}):
            assert c.post("/v1/tokens", json=bad, headers=admin).status_code == 400, bad
        # a lifetime no date can show is refused before anything is stored (it used to be a
        # 500 after the token was stored, and every later token list and events read failed)
        tokens = len(c.get("/v1/tokens", headers=admin).json()["items"])
        for ttl in (b"NaN", b"Infinity", b"1e400", b"1e308", str(10 * 365 * 86400 + 1).encode()):
            r = c.post("/v1/tokens", content=b'{"purpose": "api", "role": "read", "ttlSeconds": ' + ttl + b"}", headers=admin)
            assert r.status_code == 400 and "ttlSeconds" in r.json()["error"], (ttl, r.text)
        assert len(c.get("/v1/tokens", headers=admin).json()["items"]) == tokens
        assert c.get("/v1/events", headers=admin).status_code == 200
        assert c.post("/v1/tokens", content=b"not json", headers=admin).status_code == 400


def test_serve_refuses_a_public_address_without_auth(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "data"
    proc = support.cli("serve", "--data-dir", str(data_dir), "--host", "0.0.0.0", "--port", str(support.free_port()),
                       "--agent-port", str(support.free_port()), timeout=60)
    assert proc.returncode == 2, proc
    out = proc.stdout + proc.stderr
    assert "refusing to serve the admin API on 0.0.0.0 without authentication" in out, out
    assert "--auth token" in out
    assert not data_dir.exists()  # refused before anything was written


def test_edgeplane_serve_subprocess_answers_and_stops(tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    serve = support.ServeProcess(tmp_path / "data", artifact_root=offline_fleet).wait_ready()
    try:
        assert httpx.get(f"{serve.url}/healthz", timeout=10).json() == {"status": "ok"}
        sites = (offline_fleet / "sites.yaml").read_text()
        r = httpx.post(f"{serve.url}/v1/apply", content=sites, timeout=30)
        assert r.status_code == 200
    finally:
        assert serve.stop() == 0, serve.log()
    assert (tmp_path / "data" / "admin.token").exists()
    # restart on the same data: the state is still there
    serve = support.ServeProcess(tmp_path / "data", artifact_root=offline_fleet).wait_ready()
    try:
        items = httpx.get(f"{serve.url}/v1/sites", timeout=10).json()["items"]
        assert sorted(o["metadata"]["name"] for o in items) == sorted(support.example_names()["Site"])
        assert {yaml.safe_dump(o["spec"]["location"]) for o in items}  # specs came back whole
    finally:
        serve.stop()


def test_a_store_that_cannot_write_answers_503_with_why_and_applies_nothing(tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    """A full disk under the SQLite store (SQLite's page limit stands in for it): apply says
    why with 503, where it answered 500 "Internal Server Error", and nothing is half applied."""
    cp = start_control_plane(tmp_path / "cp", offline_fleet)
    try:
        assert cp.cp is not None
        with httpx.Client(base_url=cp.url, timeout=30) as http:
            body = loader.bundle([(p.name, p.read_text()) for p in sorted(offline_fleet.glob("*.yaml"))])
            support.sqlite_connection(cp.cp.store).execute("PRAGMA max_page_count = 1")  # no page beyond those it has
            r = http.post("/v1/apply", content=body)
            assert r.status_code == 503, r.text
            assert "database or disk is full; nothing was changed" in r.json()["error"]
            assert http.get("/v1/sites").json()["items"] == []
            support.sqlite_connection(cp.cp.store).execute("PRAGMA max_page_count = 1073741823")
            assert http.post("/v1/apply", content=body).status_code == 200
    finally:
        cp.stop()


def test_a_stored_time_no_date_can_show_reads_as_none() -> None:
    """A token expiry an earlier version stored unchecked (1e308, NaN) must not break the
    token list and the event log that show it."""
    for ts in (1e308, float("inf"), float("nan"), -1e308):
        assert catalog.rfc3339(ts) is None, ts
    assert catalog.rfc3339(0.0) == "1970-01-01T00:00:00Z"


@pytest.mark.parametrize("path", ["/v1/sites", "/v1/models"])
def test_a_list_is_read_a_page_at_a_time_with_limit_and_continue(api: httpx.Client, fleet: dict, path: str) -> None:
    def key(o: dict) -> str:
        return o["metadata"]["name"]

    whole = api.get(path).json()
    assert "metadata" not in whole and len(whole["items"]) > 2
    pages, params = [], {"limit": "2"}
    for _ in range(len(whole["items"])):
        r = api.get(path, params=params)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        if not (token := pages[-1]["metadata"].get("continue")):
            break
        params = {"limit": "2", "continue": token}
    assert all(len(p["items"]) == 2 for p in pages[:-1]) and 1 <= len(pages[-1]["items"]) <= 2
    assert [key(i) for p in pages for i in p["items"]] == [key(i) for i in whole["items"]]
    assert {k: v for k, v in pages[0].items() if k not in ("items", "metadata")} == {k: v for k, v in whole.items() if k != "items"}


@pytest.mark.parametrize("path, params, says", [
    ("/v1/sites", {"limmit": "10"}, "unknown query parameter 'limmit'"),
    ("/v1/placements", {"page": "2"}, "unknown query parameter 'page'"),
    ("/v1/sites", {"limit": "0"}, "limit must be a whole number"),
    ("/v1/sites", {"limit": "ten"}, "limit must be a whole number"),
    ("/v1/sites", {"limit": "2", "continue": "not-a-token"}, "continue is not a token"),
    ("/v1/sites", {"continue": "eyJsaXN0IjoiU2l0ZSIsImFmdGVyIjpbImEiXX0"}, "continue is given without limit"),
    ("/v1/models", {"limit": "2", "continue": "eyJsaXN0IjoiU2l0ZSIsImFmdGVyIjpbImEiXX0"}, "token of the list of Site, not of Model"),
    # keys no store holds nor can be asked for: a lone surrogate (SQLite cannot encode it), a NUL (PostgreSQL refuses it)
    ("/v1/placements", {"limit": "2", "continue": paging.continue_token("placements", ("\ud800", "a", "b"))}, "continue is not a token"),
    ("/v1/placements", {"limit": "2", "continue": paging.continue_token("placements", ("a\x00", "a", "b"))}, "continue is not a token"),
])
def test_a_list_refuses_a_parameter_it_does_not_read_naming_it(api: httpx.Client, path: str, params: dict, says: str) -> None:
    r = api.get(path, params=params)
    assert r.status_code == 400 and says in r.json()["error"], r.text


def test_a_list_builds_its_manifests_off_the_event_loop(api: httpx.Client, fleet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop is the gateway's and the agents' streams': a fleet's manifests and their JSON
    (megabytes at thousands of sites) are built in a worker thread."""
    on_loop, real = [], catalog.to_manifest

    def watched(obj):  # type: ignore[no-untyped-def]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            on_loop.append(obj.name)
        return real(obj)

    monkeypatch.setattr(catalog, "to_manifest", watched)
    assert api.get("/v1/sites").json()["items"] and api.get("/v1/sites", params={"limit": "1"}).json()["items"]
    assert on_loop == []


def test_the_cli_reads_a_whole_list_in_pages_as_one_answer(api: httpx.Client, fleet: dict, control_plane: support.ServerThread) -> None:
    from orchestrator.cli import http as cli_http

    client = cli_http.ApiClient(control_plane.url, None)
    for path in ("/v1/sites", "/v1/modeldeployments", "/v1/placements"):
        assert client.request_list(path, page_size=2) == api.get(path).json(), path


def test_a_time_window_takes_rfc_3339_in_lower_case_too(api: httpx.Client, fleet: dict) -> None:
    every = api.get("/v1/events", params={"last": 10_000}).json()["items"]
    first = every[0]["ts"]  # 2026-12-07T03:12:04Z: RFC 3339 lets T and Z be written t and z
    answer = api.get("/v1/events", params={"after": first.lower(), "last": 10_000})
    assert answer.status_code == 200, answer.text
    assert [e for e in answer.json()["items"] if e["id"] <= every[-1]["id"]] == every  # and those logged since
    assert api.get("/v1/events", params={"before": first.replace("T", "t")}).json()["items"] == []


def test_a_time_whose_plus_a_url_query_read_as_a_space_is_refused_saying_so(api: httpx.Client, fleet: dict) -> None:
    # curl 'http://cp/v1/events?after=2026-12-07T04:00:00+01:00': a query's '+' is a space
    refused = api.get("/v1/events?after=2026-12-07T04:00:00+01:00")
    assert refused.status_code == 400 and refused.json()["parameter"] == "after"
    assert "%2B" in refused.json()["error"], refused.text
    assert api.get("/v1/events?after=2026-12-07T04:00:00%2B01:00").status_code == 200
