"""Capture: opt-in, sampled and capped, kept only in the store of the caller's jurisdiction,
expired after retention, erasable by id, and readable only by an admin (audited)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.testclient import TestClient

from orchestrator import catalog
from orchestrator.api import auth
from orchestrator.api import captures as captures_api
from orchestrator.distill import capture
from orchestrator.distill import store as capture_store
from orchestrator.gateway import cascade, cascade_rules, endpoints, routing, wire
from orchestrator.manifests import cascade as cascade_schema
from orchestrator.manifests import loader
from orchestrator.reconciler import loop, planning, snapshot
from orchestrator.scheduler.residency import expand_residency
from orchestrator.store import sqlite as store_mod
from tests.cascade.transport import Transport
from tests.foundation.support import sqlite_connection

RULE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)
POLICY = capture.CapturePolicy(sample_rate=1.0, daily_cap=1000, retention_s=7 * capture.DAY_S, zones=("EU",))
ROUTE = cascade_rules.CascadeRoute("m", "dep", (
    cascade_rules.StageRoute("small", frozenset({"edge"}), RULE),
    cascade_rules.StageRoute("large", frozenset({"datacenter"}), None),
), {}, POLICY)
COUNTRIES = ["FR", "DE", "IT", "CH", "US"]


def capturing(store: store_mod.Store, retention_days: float = 30, name: str = "dep", zones: tuple[str, ...] = ("EU",),
              daily_cap: int = 10_000) -> None:
    """Apply ModelDeployment ``name``, a cascade that captures in ``zones`` for ``retention_days``."""
    docs = [{"kind": "Model", "metadata": {"name": "m"}, "spec": {"variants": [
                {"name": v, "runtime": "onnx", "artifact": {"uri": f"{v}.onnx", "sha256": c * 64}} for v, c in (("small", "0"), ("large", "1"))]}},
            {"kind": "ModelDeployment", "metadata": {"name": name}, "spec": {
                "model": "m", "variant": {"edge": "small", "datacenter": "large"},
                "cascade": {"stages": [{"variant": "small", "escalate": {"confidence": {"output": "p", "below": 0.8}}}, {"variant": "large"}],
                            "capture": {"sampleRate": 1.0, "retentionDays": retention_days, "zones": list(zones), "dailyCap": daily_cap}}}}]
    catalog.apply_documents(store, loader.load_text("---\n".join(json.dumps({"apiVersion": "edgeplane.io/v1alpha1", **d}) + "\n" for d in docs)),
                            actor="test")


def ep(site: str, tier: str, country: str) -> routing.Endpoint:
    return routing.Endpoint(model="m", deployment="dep", site=site, tier=tier, country=country, region="", lat=48.8, lon=2.3,
                            url=f"http://{site}")


def serve(route: cascade_rules.CascadeRoute, fleet: list[routing.Endpoint], behaviour: dict[str, str], caller: routing.Caller,
          n: int = 1, now: float = 1_000_000.0) -> list[capture_store.Record]:
    table = endpoints.EndpointTable()
    table.replace(fleet)
    table.cascades = {"m": route}
    kept: list[capture_store.Record] = []
    answered: list[int] = []
    handler = cascade.CascadeHandler(table, Transport({f"http://{k}": v for k, v in behaviour.items()}),  # type: ignore[arg-type]
                                     cascade.CascadeMetrics.create(CollectorRegistry()),
                                     capture=lambda r, cap: kept.append(r) is None, sampler=capture.Sampler(draw=lambda: 0.0),
                                     wall=lambda: now)
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})

    async def plain() -> Any:
        raise AssertionError("cascade off is not asked for")

    async def go() -> None:
        for _ in range(n):
            response = await handler.infer(route, "on", caller, request, b'{"inputs": []}', plain)
            answered.append(response.status_code)
    asyncio.run(go())
    assert len(kept) <= answered.count(200)  # a failed request is never kept
    return kept


def test_nothing_is_captured_without_capture_in_the_manifest() -> None:
    fleet = [ep("edge-fr", "edge", "FR"), ep("dc-fr", "datacenter", "FR")]
    assert serve(dataclasses.replace(ROUTE, capture=None), fleet, {"edge-fr": "unsure", "dc-fr": "sure"}, routing.Caller(), n=5) == []


def test_a_record_holds_input_last_output_first_confidence_time_site_and_zone() -> None:
    fleet = [ep("edge-fr", "edge", "FR"), ep("dc-fr", "datacenter", "FR")]
    [record] = serve(ROUTE, fleet, {"edge-fr": "unsure", "dc-fr": "sure"}, routing.Caller())
    assert (record.zone, record.site, record.stage, record.deployment) == ("EU", "edge-fr", "large", "dep")
    assert record.first_confidence == pytest.approx(0.55)
    assert record.input == b'{"inputs": []}'
    assert json.loads(record.output)["outputs"][0]["data"] == pytest.approx([0.9, 0.1])  # the teacher's (last stage's) answer
    assert record.captured_at == 1_000_000.0 and record.expires_at == 1_000_000.0 + 7 * capture.DAY_S


def test_a_request_is_filed_in_the_zone_of_the_replica_that_received_it_after_a_failover() -> None:
    # the nearest edge (Paris) refuses the connection, Geneva's answers: the request was received in CH
    fleet = [dataclasses.replace(ep("edge-fr", "edge", "FR"), lat=48.85, lon=2.35),
             dataclasses.replace(ep("edge-ch", "edge", "CH"), lat=46.2, lon=6.14),
             dataclasses.replace(ep("dc-ch", "datacenter", "CH"), lat=47.37, lon=8.54)]
    route = dataclasses.replace(ROUTE, capture=dataclasses.replace(POLICY, zones=("FR", "CH")))
    [record] = serve(route, fleet, {"edge-fr": "down", "edge-ch": "sure", "dc-ch": "sure"}, routing.Caller(lat=48.85, lon=2.35))
    assert (record.zone, record.site) == ("CH", "edge-ch")


@pytest.mark.parametrize(("zones", "kept_in"), [
    (("EU",), None),  # an EU store may be in Germany: no place for a deployment held to France
    (("EU", "FR"), "FR"),
    (("FR",), "FR"),
])
def test_a_caller_stating_no_residency_is_kept_only_inside_the_deployments_residency(zones: tuple[str, ...],
                                                                                    kept_in: str | None) -> None:
    """The deployment's placement.residency binds its callers' data as a caller's own
    X-Edgeplane-Residency does: routing keeps a FR deployment's requests in France, and its
    records may not go where they could not be served."""
    fleet = [dataclasses.replace(ep(site, tier, "FR"), allowed_countries=frozenset({"FR"}))
             for site, tier in (("edge-fr", "edge"), ("dc-fr", "datacenter"))]
    route = dataclasses.replace(ROUTE, capture=dataclasses.replace(POLICY, zones=zones))
    records = serve(route, fleet, {"edge-fr": "unsure", "dc-fr": "sure"}, routing.Caller())
    assert [r.zone for r in records] == ([kept_in] if kept_in else [])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edge_country=st.sampled_from(COUNTRIES), dc_country=st.sampled_from(COUNTRIES),
       zones=st.lists(st.sampled_from(["EU", *COUNTRIES]), min_size=1, max_size=4, unique=True),
       residency=st.sets(st.sampled_from(COUNTRIES), max_size=3),
       placement=st.sets(st.sampled_from(["EU", *COUNTRIES]), max_size=3), sure=st.booleans())
@example(edge_country="FR", dc_country="FR", zones=["EU", "FR"], residency=set(), placement={"FR"}, sure=False)
def test_records_stay_in_the_store_of_their_jurisdiction(edge_country: str, dc_country: str, zones: list[str],
                                                         residency: set[str], placement: set[str], sure: bool) -> None:
    """A record goes only to a zone inside the caller's residency (or, for a caller who states
    none, holding the country of the site that received the request) and inside the
    deployment's own ``placement.residency`` (``placement``; empty: any), which its replicas
    carry as routing does."""
    allowed = expand_residency(sorted(placement))
    fleet = [dataclasses.replace(ep(site, tier, country), allowed_countries=allowed)
             for site, tier, country in (("edge", "edge", edge_country), ("dc", "datacenter", dc_country))]
    received_in = {"edge": edge_country, "dc": dc_country}
    route = dataclasses.replace(ROUTE, capture=dataclasses.replace(POLICY, zones=tuple(zones)))
    caller = routing.Caller(residency=frozenset(residency))
    records = serve(route, fleet, {"edge": "sure" if sure else "unsure", "dc": "sure"}, caller, n=2)
    with tempfile.TemporaryDirectory() as tmp:
        stores = capture_store.ZoneStores(pathlib.Path(tmp))
        writer = capture_store.CaptureWriter(stores)

        async def write() -> None:
            writer.start()
            for r in records:
                assert writer.offer(r)
            await writer.stop()
        asyncio.run(write())
        total = 0
        for zone in stores.zones():
            kept = stores.zone(zone).records(now=0)
            total += len(kept)
            for r in kept:
                assert r.zone == zone  # never in another zone's file
                countries = capture.zone_countries(zone)
                if allowed:
                    assert countries <= allowed  # nor outside the deployment's residency
                if residency:
                    assert countries <= residency  # the caller's data stays inside its residency
                else:
                    assert received_in[r.site] in countries  # the country the request came in through
        assert total == len(records)
        stores.close()


def test_sample_rate_and_daily_cap() -> None:
    draws = iter([0.1, 0.9, 0.2, 0.3, 0.4])
    sampler = capture.Sampler(draw=lambda: next(draws))
    policy = dataclasses.replace(POLICY, sample_rate=0.5, daily_cap=2)
    day = 10 * capture.DAY_S
    assert [sampler.take("d", "EU", policy, day) for _ in range(4)] == [True, False, True, False]  # 0.3: the cap
    assert sampler.take("d", "EU", policy, day + capture.DAY_S)  # a new day


def test_retention_and_deletion_by_id(tmp_path: pathlib.Path) -> None:
    stores = capture_store.ZoneStores(tmp_path)
    eu = stores.zone("EU")
    old, new = (capture_store.Record(capture_store.Record.new_id(), "dep", "m", "EU", t, t + 100, "edge", "large", 0.5,
                                     b"{}", None, b"{}", None) for t in (0.0, 50.0))
    eu.add([old, new])
    assert capture.expired(0.0, 100, 100.0) and not capture.expired(50.0, 100, 100.0)
    assert [r.id for r in eu.records(now=100.0)] == [new.id]  # expired records are not read ...
    assert stores.purge(100.0, {"dep": None}) == 1 and eu.count() == 1  # ... and are deleted
    assert eu.delete(new.id) and not eu.delete(new.id) and eu.count() == 0
    with pytest.raises(ValueError):
        stores.zone("FR").add([new])  # a record never lands in another zone's store
    stores.close()


def test_retention_runs_for_every_zone_despite_other_files_in_the_captures_folder(tmp_path: pathlib.Path) -> None:
    """An operator's copy (``EU-backup.db``) is not a zone, and a zone whose file is not a
    database does not keep the other zones' expired records alive."""
    stores = capture_store.ZoneStores(tmp_path)
    for zone in ("EU", "CH"):
        stores.zone(zone).add([capture_store.Record(f"old-{zone}", "dep", "m", zone, 0, 100, "edge", "large", 0.5,
                                                    b"{}", None, b"{}", None)])
    (tmp_path / "EU-backup.db").write_bytes(b"")
    (tmp_path / "DE.db").write_bytes(b"not a database" * 100)
    assert stores.zones() == ["CH", "DE", "EU"]
    assert stores.purge(1000.0, {"dep": None}) == 2
    assert stores.zone("EU").count() == stores.zone("CH").count() == 0
    stores.close()


def test_an_erased_or_expired_record_leaves_no_bytes_in_the_zone_files(tmp_path: pathlib.Path) -> None:
    stores = capture_store.ZoneStores(tmp_path)
    secret = b"jean.dupont@example.fr " * 50
    body = b'{"inputs": [{"name": "text", "data": ["' + secret + b'"]}]}'
    eu = stores.zone("EU")
    eu.add([capture_store.Record(f"r{i}", "dep", "m", "EU", 0, 100 if i else 1e12, "edge", "large", 0.4, body, None, body, None)
            for i in range(2)])

    def files() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret in files()
    assert eu.delete("r0") and stores.purge(1000.0, {"dep": None}) == 1
    assert secret not in files()  # while the store is open: nothing left in the log either
    stores.close()


def test_records_expire_by_their_deployments_current_retention(tmp_path: pathlib.Path) -> None:
    """Lowering retentionDays (30 -> 1) applies to the records already captured, and a deployment
    that no longer captures (capture turned off, or the deployment deleted) keeps none."""
    day, now = capture.DAY_S, 100 * capture.DAY_S
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: 0.0)  # the deployments exist since before their records
    stores = capture_store.ZoneStores(tmp_path / "captures")

    def record(i: str, deployment: str, age_days: float) -> capture_store.Record:  # captured under a 30-day retention
        at = now - age_days * day
        return capture_store.Record(i, deployment, "m", "EU", at, at + 30 * day, "edge", "large", 0.4, b"{}", None, b"{}", None)
    stores.zone("EU").add([record("old", "dep", 10), record("new", "dep", 0.5), record("gone", "deleted", 0.5)])
    capturing(store, retention_days=1)
    assert [r.id for r in stores.zone("EU").records("dep", now=now, retention_s=day)] == ["new"]  # not read ...
    app = Starlette(routes=captures_api.routes(auth.Authenticator(store, required=False), store, stores, clock=lambda: now))
    with TestClient(app) as client:
        assert [i["id"] for i in client.get("/v1/captures/EU").json()["items"]] == ["new"]
    assert stores.zone("EU").count() == 1  # ... and deleted
    capturing(store, retention_days=30, name="unparsed")
    stores.zone("EU").add([record("kept", "unparsed", 10)])
    assert stores.purge(now, {"dep": capture.Covered(day, frozenset({"EU"})), "unparsed": None}) == 0  # a policy it cannot read: the stored expiry stands
    stores.zone("EU").add([record("past", "unparsed", 31)])
    assert stores.purge(now, None) == 1  # the policies cannot be read: the stored expiry still runs out
    assert stores.purge(now, {"unparsed": None}) == 1 and [r.id for r in stores.zone("EU").records(now=now)] == ["kept"]
    stores.close()
    store.close()


def test_a_capture_read_with_a_parameter_it_does_not_read_is_refused(tmp_path: pathlib.Path) -> None:
    """A misspelt ``deployment`` would list every deployment's records, ``payload`` included."""
    with captures_of_one_record(tmp_path) as client:
        refused = client.get("/v1/captures/EU", params={"deploymnet": "other", "payload": "true"})
        assert refused.status_code == 400
        assert refused.json()["error"] == "unknown query parameter 'deploymnet': this list takes limit, payload, deployment"
        assert len(client.get("/v1/captures/EU", params={"deployment": "dep", "limit": "5"}).json()["items"]) == 1


@contextlib.contextmanager
def captures_of_one_record(tmp_path: pathlib.Path) -> Iterator[TestClient]:
    """The capture API over one zone's store holding one record of ``dep``, captured a minute ago."""
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: 0.0)
    stores = capture_store.ZoneStores(tmp_path / "captures")
    now = 10 * capture.DAY_S
    try:
        capturing(store)
        stores.zone("EU").add([record_of("dep", "EU", now - 60)])
        app = Starlette(routes=captures_api.routes(auth.Authenticator(store, required=False), store, stores, clock=lambda: now))
        with TestClient(app) as client:
            yield client
    finally:
        stores.close()
        store.close()


def record_of(deployment: str, zone: str, at: float) -> capture_store.Record:
    return capture_store.Record(capture_store.Record.new_id(), deployment, "m", zone, at, at + 30 * capture.DAY_S, "edge", "large", 0.4,
                                b'{"inputs": [{"name": "x", "data": ["personal data"]}]}', None, b"{}", None)


def test_records_in_a_zone_taken_out_of_the_capture_policy_are_deleted(tmp_path: pathlib.Path) -> None:
    """zones [EU, FR] narrowed to [FR]: the EU store may no longer hold this deployment's
    data, and the next purge (or read) deletes it there, long before its retention ends."""
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: 0.0)
    stores = capture_store.ZoneStores(tmp_path / "captures")
    now = 10 * capture.DAY_S
    try:
        capturing(store, zones=("EU", "FR"))
        stores.zone("EU").add([record_of("dep", "EU", now - 60) for _ in range(3)])
        stores.zone("FR").add([record_of("dep", "FR", now - 60) for _ in range(2)])
        capturing(store, zones=("FR",))
        app = Starlette(routes=captures_api.routes(auth.Authenticator(store, required=False), store, stores, clock=lambda: now))
        with TestClient(app) as client:
            assert client.get("/v1/captures/EU").json()["items"] == []
        assert stores.zone("EU").count("dep") == 0
        assert stores.purge(now, catalog.capture_retention(store)) == 0 and stores.zone("FR").count("dep") == 2  # still covered
    finally:
        stores.close()
        store.close()


def test_records_of_a_deleted_deployment_are_deleted_even_when_it_is_applied_again_before_the_purge(tmp_path: pathlib.Path) -> None:
    """The deployment applied again under the same name is another one: its policy covers what
    it captures, not what the deleted one did."""
    clock = [0.0]
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: clock[0])
    stores = capture_store.ZoneStores(tmp_path / "captures")
    try:
        capturing(store)
        stores.zone("EU").add([record_of("dep", "EU", 100.0)])
        clock[0] = 200.0
        catalog.delete_object(store, "ModelDeployment", "dep", actor="test")
        capturing(store)
        stores.zone("EU").add([record_of("dep", "EU", 300.0)])
        assert stores.purge(400.0, catalog.capture_retention(store)) == 1
        assert [r.captured_at for r in stores.zone("EU").records("dep", now=400.0)] == [300.0]
    finally:
        stores.close()
        store.close()


def published_route(store: store_mod.Store) -> cascade_rules.CascadeRoute:
    """Deployment ``dep``'s cascade as a pass publishes it and a standalone gateway reads it."""
    desired = loop.Reconciler(store, None, None, None, endpoints.EndpointTable()).read_desired()  # type: ignore[arg-type]
    pass_of = snapshot.Snapshot(desired.sites, desired.models, desired.deployments, (), (), {}, {}, {}, {})
    return wire.cascade_from_json(wire.cascade_to_json(planning.cascade_routes(pass_of)["dep"]))


def escalated(route: cascade_rules.CascadeRoute, now: float) -> list[capture_store.Record]:
    """What a gateway routing by ``route`` captures at ``now`` of one request that edge-fr is
    unsure of and dc-fr answers."""
    fleet = [ep("edge-fr", "edge", "FR"), ep("dc-fr", "datacenter", "FR")]
    return serve(route, fleet, {"edge-fr": "unsure", "dc-fr": "sure"}, routing.Caller(), now=now)


def test_a_record_captured_by_a_gateway_whose_clock_is_behind_the_replica_that_applied_the_deployment_is_kept(
        tmp_path: pathlib.Path) -> None:
    """On a shared database the deployment's creation time is the applying replica's clock, a
    record's capture time the capturing gateway's: 10 s behind, a record captured in the
    deployment's first 10 s is still its own, at every purge."""
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: 1_000.0)
    stores = capture_store.ZoneStores(tmp_path / "captures")
    try:
        capturing(store)
        stores.zone("EU").add(escalated(published_route(store), now=995.0))
        assert stores.purge(2_000.0, catalog.capture_retention(store)) == 0 and stores.zone("EU").count("dep") == 1
    finally:
        stores.close()
        store.close()


def test_records_a_deleted_deployment_captured_are_deleted_whatever_the_clocks_say(tmp_path: pathlib.Path) -> None:
    """A gateway still routing by the deleted deployment's cascade captures after the new one
    was created: that record is the deleted one's all the same; the new one's are kept."""
    clock = [100.0]
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: clock[0])
    stores = capture_store.ZoneStores(tmp_path / "captures")
    try:
        capturing(store)
        deleted = published_route(store)
        clock[0] = 200.0
        catalog.delete_object(store, "ModelDeployment", "dep", actor="test")
        capturing(store)
        for route in (deleted, published_route(store)):
            stores.zone("EU").add(escalated(route, now=300.0))
        assert stores.purge(400.0, catalog.capture_retention(store)) == 1
        assert [r.deployment_created for r in stores.zone("EU").records("dep", now=400.0)] == [200.0]
    finally:
        stores.close()
        store.close()


def capture_off(store: store_mod.Store, name: str = "dep") -> None:
    """Apply ModelDeployment ``name`` again as stored, without ``spec.cascade.capture``."""
    obj = store.get("ModelDeployment", name)
    assert obj is not None
    spec = json.loads(json.dumps(obj.spec))
    del spec["cascade"]["capture"]
    catalog.apply_documents(store, loader.load_text(json.dumps({"apiVersion": "edgeplane.io/v1alpha1", "kind": "ModelDeployment",
                                                                "metadata": {"name": name}, "spec": spec})), actor="test")


def test_records_captured_before_capture_was_turned_off_are_deleted_even_when_it_is_turned_on_again_before_the_purge(
        tmp_path: pathlib.Path) -> None:
    """Turning capture off withdraws what it was kept for: turned on again, capture covers what
    it captures from then on, not what was captured before, whatever the clocks say (a
    gateway still routing by the earlier route captures after it was turned on again)."""
    clock = [100.0]
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: clock[0])
    stores = capture_store.ZoneStores(tmp_path / "captures")
    try:
        capturing(store)
        before = published_route(store)
        stores.zone("EU").add(escalated(before, now=150.0))
        clock[0] = 200.0
        capture_off(store)
        clock[0] = 250.0
        capturing(store)
        again = published_route(store)
        for route in (before, again):
            stores.zone("EU").add(escalated(route, now=300.0))
        assert stores.purge(400.0, catalog.capture_retention(store)) == 2
        assert [r.deployment_created for r in stores.zone("EU").records("dep", now=400.0)] == [again.capture.deployment]  # type: ignore[union-attr]
        capturing(store, retention_days=20)  # changed, still on: what it keeps is kept
        assert stores.purge(400.0, catalog.capture_retention(store)) == 0 and stores.zone("EU").count("dep") == 1
    finally:
        stores.close()
        store.close()


def test_a_zone_file_an_earlier_release_wrote_takes_stamped_records_and_keeps_its_own(tmp_path: pathlib.Path) -> None:
    """Its records carry no deployment's identity: they are the deployment's when captured
    after it was created, as that release decided."""
    (tmp_path / "captures").mkdir()
    earlier = capture_store.SCHEMA.replace(",\n    deployment_created REAL", "")
    assert "deployment_created" not in earlier
    with contextlib.closing(sqlite3.connect(tmp_path / "captures" / "EU.db")) as db:
        db.executescript(earlier)
        db.execute("INSERT INTO records VALUES ('old', 'dep', 'm', 'EU', 150, 1e12, 'edge', 'large', 0.4, x'7b7d', NULL, x'7b7d', NULL)")
        db.commit()
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: 100.0)
    stores = capture_store.ZoneStores(tmp_path / "captures")
    try:
        capturing(store)
        stores.zone("EU").add([dataclasses.replace(record_of("dep", "EU", 160.0), deployment_created=100.0)])
        assert stores.purge(400.0, catalog.capture_retention(store)) == 0
        assert [r.deployment_created for r in stores.zone("EU").records("dep", now=400.0)] == [None, 100.0]  # "old" first
    finally:
        stores.close()
        store.close()


def test_a_full_queue_drops_and_counts() -> None:
    async def go() -> capture_store.CaptureWriter:
        writer = capture_store.CaptureWriter(capture_store.ZoneStores(pathlib.Path("/nonexistent")), maxsize=2)
        record = capture_store.Record("x", "dep", "m", "EU", 0, 1, "s", "v", None, b"", None, b"", None)
        return writer if [writer.offer(record) for _ in range(3)] == [True, True, False] else pytest.fail("no drop")
    assert asyncio.run(go()).dropped == 1


def test_the_queue_is_bounded_in_bytes_too(tmp_path: pathlib.Path) -> None:
    """A record holds a whole request and answer (up to 80 MiB): a lagging disk must not let the
    gateway hold a thousand of them."""
    def record(i: int, size: int) -> capture_store.Record:
        big = bytes(size)
        return capture_store.Record(f"r{i}", "dep", "m", "EU", 0, 1e12, "edge", "large", 0.5, big, None, big, None)
    registry = CollectorRegistry()

    async def go() -> None:
        lagging = capture_store.CaptureWriter(capture_store.ZoneStores(tmp_path / "lagging"), registry)  # never started
        largest = record(0, 16 << 20)  # a request at the gateway's limit (and as large an answer)
        assert [lagging.offer(largest) for _ in range(20)] == [True] * 8 + [False] * 12
        assert lagging.queued_bytes == capture_store.MAX_QUEUED_BYTES
        writer = capture_store.CaptureWriter(capture_store.ZoneStores(tmp_path / "writing"), max_bytes=4 << 20)
        assert [writer.offer(record(i, 1 << 20)) for i in range(3)] == [True, True, False]
        writer.start()
        await writer.flush()  # written: the budget is free again
        assert writer.queued_bytes == 0 and writer.offer(record(3, 1 << 20))
        await writer.stop()
        assert writer.captured == 3
    asyncio.run(go())
    assert registry.get_sample_value("edgeplane_capture_dropped_total") == 12


def test_manifest_capture_is_checked() -> None:
    ok = cascade_schema.Capture(sampleRate=0.1, zones=["EU", "CH"])
    assert ok.dailyCap == 10_000 and ok.retentionDays == 30
    for bad in ({"sampleRate": 0, "zones": ["EU"]}, {"sampleRate": 0.1, "zones": []}, {"sampleRate": 0.1, "zones": ["XX"]},
                {"sampleRate": 0.1, "zones": ["EU", "EU"]}, {"sampleRate": 0.1, "zones": ["EU"], "where": "x"}):
        with pytest.raises(ValueError):
            cascade_schema.Capture.model_validate(bad)


def test_only_an_admin_reads_or_deletes_and_it_is_audited(tmp_path: pathlib.Path) -> None:
    store = store_mod.Store(tmp_path / "state.db", clock=lambda: 0.0)  # the deployment exists since before its record
    stores = capture_store.ZoneStores(tmp_path / "captures")
    record = capture_store.Record("r1", "dep", "m", "EU", 0, 1e12, "edge", "large", 0.4, b"{}", None, b"{}", None)
    stores.zone("EU").add([record])
    capturing(store)
    admin, _ = store.create_token("api", "admin", None, "test", "admin")
    reader, _ = store.create_token("api", "read", None, "test", "reader")
    app = Starlette(routes=captures_api.routes(auth.Authenticator(store, required=True), store, stores, clock=lambda: 1000.0))
    with TestClient(app) as client:
        assert client.get("/v1/captures/EU").status_code == 401
        assert client.get("/v1/captures/EU", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/captures/EU", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
        assert client.delete("/v1/captures/EU/r1", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
        got = client.get("/v1/captures/EU?payload=true", headers={"Authorization": f"Bearer {admin}"})
        assert got.status_code == 200 and [i["id"] for i in got.json()["items"]] == ["r1"] and got.json()["items"][0]["input"]
        assert client.delete("/v1/captures/EU/r1", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
        assert client.delete("/v1/captures/EU/r1", headers={"Authorization": f"Bearer {admin}"}).status_code == 404
    audit = [(e.action, e.details) for e in store.events(0, 100) if e.action.startswith("capture-")]
    assert audit == [("capture-read", {"zone": "EU", "records": 1, "payload": True}),
                     ("capture-delete", {"zone": "EU", "found": True}), ("capture-delete", {"zone": "EU", "found": False})], audit
    stores.close()
    store.close()


def filled(store: store_mod.Store) -> None:
    """The state store's disk is full: no page beyond those it has, and no room left in them."""
    sqlite_connection(store).execute("PRAGMA max_page_count = 1")  # (as many as it has: it never shrinks)
    for size in (400, 20, 0):  # then smaller, into what room the larger left
        for i in range(100_000):
            try:
                store.record(store_mod.Event("test", "filler", "Site", f"filler-{size}-{i}", "x" * size))
            except store_mod.StoreUnavailable:
                break
        else:
            raise AssertionError("the store never filled")


def test_an_erasure_the_event_log_cannot_take_is_not_made_and_is_answered_503(tmp_path: pathlib.Path) -> None:
    """Every erasure is in the audit trail: while the state store cannot write its event (a
    full disk here; a failover, a stalled database), the record stays and the caller is told
    to ask again (503, Retry-After), as every route answers then; asked again, it is erased
    and logged."""
    store = store_mod.Store(tmp_path / "state.db")
    stores = capture_store.ZoneStores(tmp_path / "captures")
    record = record_of("dep", "EU", 0.0)
    stores.zone("EU").add([record])
    app = Starlette(routes=captures_api.routes(auth.Authenticator(store, required=False), store, stores, clock=lambda: 1000.0))
    try:
        filled(store)
        with TestClient(app, raise_server_exceptions=False) as client:
            refused = client.delete(f"/v1/captures/EU/{record.id}")
            assert refused.status_code == 503 and refused.headers.get("retry-after"), (refused.status_code, refused.text[:300])
            assert "full" in refused.json()["error"]
            assert stores.zone("EU").count() == 1  # not erased unlogged
            sqlite_connection(store).execute("PRAGMA max_page_count = 1073741823")  # room again
            assert client.delete(f"/v1/captures/EU/{record.id}").status_code == 200
        assert stores.zone("EU").count() == 0
        audit = [(e.name, e.details) for e in store.events(0, 100_000) if e.action == "capture-delete"]
        assert audit == [(record.id, {"zone": "EU", "found": True})], audit
    finally:
        stores.close()
        store.close()


def test_records_a_zone_cannot_write_are_counted_and_logged_once_per_error(tmp_path: pathlib.Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A zone whose store cannot be written (here its file is a directory) lost every record
    without a metric or a log line; the other zones go on writing."""
    def record(i: int, zone: str) -> capture_store.Record:
        return capture_store.Record(f"r{i}", "dep", "m", zone, 0, 1e12, "edge", "small", 0.5, b"{}", None, b"{}", None)
    root = tmp_path / "captures"
    (root / "EU.db").mkdir(parents=True)  # not a file SQLite can open
    registry = CollectorRegistry()

    async def go() -> capture_store.CaptureWriter:
        writer = capture_store.CaptureWriter(capture_store.ZoneStores(root), registry, batch=2)
        writer.start()
        for i in range(5):
            assert writer.offer(record(i, "EU")) and writer.offer(record(100 + i, "CH"))
        await writer.flush()
        await writer.stop()
        return writer

    with caplog.at_level("WARNING", logger=capture_store.__name__):
        writer = asyncio.run(go())
    assert (writer.failed, writer.captured) == (5, 5)
    assert registry.get_sample_value("edgeplane_capture_failed_total", {"zone": "EU"}) == 5
    assert registry.get_sample_value("edgeplane_capture_failed_total", {"zone": "CH"}) is None
    assert registry.get_sample_value("edgeplane_capture_records_total", {"zone": "CH"}) == 5
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "zone EU" in warned[0], warned  # one line for the error, not one per batch or record


@pytest.mark.parametrize("limit", ["\u0663", "\u00b2", "1" * 5000, "0", "10001"])
def test_a_capture_read_whose_limit_is_not_a_whole_number_in_range_is_refused(tmp_path: pathlib.Path, limit: str) -> None:
    """As the lists refuse it: '٣' is no 3, and a limit past the most is not cut silently."""
    with captures_of_one_record(tmp_path) as client:
        refused = client.get("/v1/captures/EU", params={"limit": limit})
        assert refused.status_code == 400, refused.text[:300]
        assert refused.json()["error"].startswith("limit must be a whole number from 1 to 10,000")


def test_a_capture_read_with_a_limit_answers_the_newest_records(tmp_path: pathlib.Path) -> None:
    """A data subject asks to erase what was just captured of them: with more records in the
    zone than a read may answer, the newest must be among those listed, or no ID to erase
    is ever shown. The answer lists them oldest first, as the event log's newest N."""
    with captures_of_one_record(tmp_path) as client:
        stores = capture_store.ZoneStores(tmp_path / "captures")
        now = 10 * capture.DAY_S
        later = [record_of("dep", "EU", now - 60 + i) for i in range(1, 4)]
        stores.zone("EU").add(later)
        stores.close()
        got = client.get("/v1/captures/EU", params={"limit": "2"})
        assert got.status_code == 200, got.text[:300]
        assert [i["id"] for i in got.json()["items"]] == [later[1].id, later[2].id]
