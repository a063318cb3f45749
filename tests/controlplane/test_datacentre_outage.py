"""A data centre out of reach for less time than an agent is given before it is declared lost
keeps its replicas: its cluster most likely serves on (an API server restarting for an
upgrade, a dropped connection), and moving off would build all it runs again elsewhere,
then delete it there once it answers, for a KubeRay site its RayService and the whole Ray
cluster with it. The Kubernetes API is a stateful emulator (kmock) over real HTTP that
answers 503 for the outage."""

from __future__ import annotations

import contextlib
import http.server
import json
import pathlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import kmock
import pytest
import yaml

from orchestrator import server
from orchestrator.adapters import rayservice, serve_config
from orchestrator.adapters.ownership import OwnedElsewhere
from orchestrator.gateway import wire
from orchestrator.manifests import schema
from orchestrator.reconciler import datacentre_sync, observed
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import snapshot as snap
from orchestrator.store import open_store
from orchestrator.testing import harness, loopback
from orchestrator.testing.postgres import PostgresServer
from tests.controlplane.datacentres import (MODEL, Cluster, ServeDashboard, bundle, deployment, has_rayservice, kuberay_on, site,
                                            site_events, site_status, start)


async def test_a_kubernetes_api_outage_shorter_than_the_loss_time_neither_moves_replicas_nor_deletes_the_rayservice(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    cp = await start(fleet, kuberay_on(kube))  # declared lost after 3 heartbeats of 0.5 s
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), site("dc-2"), MODEL, deployment("d")))
        assert applied.status_code == 200, applied.text
    await harness.wait_until(lambda: has_rayservice(kube, "dc-1") or has_rayservice(kube, "dc-2"), 30, what="d's RayService")
    home, other = ("dc-1", "dc-2") if has_rayservice(kube, "dc-1") else ("dc-2", "dc-1")
    placed = cp.store.placements()

    # The next two reads of home's RayService fail: an outage through one backoff, answered
    # again by the try its loss time brings.
    reads = kube["get", kmock.path(f"/apis/ray.io/v1/namespaces/ns-{home}/rayservices/{rayservice.rayservice_name(home)}")]
    done = len(list(reads))
    reads[done:done + 2] << 503
    await harness.wait_until(lambda: any(action == "datacentre-recovered" for action, _ in site_events(cp, home)), 30,
                             what=f"{home} observed again after its outage")
    await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)  # and planned, applied and removed from since

    assert any(action == "datacentre-error" and "503" in reason for action, reason in site_events(cp, home)), site_events(cp, home)
    assert cp.store.placements() == placed
    assert has_rayservice(kube, home), f"{home}'s RayService was deleted"
    assert not has_rayservice(kube, other), f"d was placed on {other} too"


class ServeProxy:
    """A Ray Serve HTTP proxy on loopback: it answers every v2 inference under the routes it
    serves, whatever the dashboard beside it does. ``requests``: the paths it answered."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                proxy.requests.append(self.path)
                data = json.dumps({"model_name": "m", "outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._serving = contextlib.ExitStack()
        self.url = self._serving.enter_context(loopback.http_server(Handler))

    def stop(self) -> None:
        self._serving.close()


@pytest.fixture
def serve_site() -> Iterator[tuple[ServeDashboard, ServeProxy]]:
    dashboard, proxy = ServeDashboard(), ServeProxy()
    yield dashboard, proxy
    proxy.stop()
    with contextlib.suppress(OSError):
        dashboard.stop()


INFER = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}


async def test_a_data_centre_out_of_reach_stays_routed_as_last_observed_until_it_is_declared_lost(
        fleet: harness.Fleet, serve_site: tuple[ServeDashboard, ServeProxy]) -> None:
    """Its dashboard down (the cluster's API, not its Serve proxy): the replicas most likely
    answer on, so the gateway of every replica keeps routing to them as last observed, and
    the placement says the data centre does not answer; once declared lost they leave the table."""
    dashboard, proxy = serve_site
    cp = await fleet.start_control_plane(kube_factory=kuberay_on(kmock.KubernetesEmulator()), resync_s=0.2,
                                         heartbeat_interval_s=0.5, missed_heartbeats=12)  # declared lost after 6 s
    routed = "/ep/dc-1/d/v/v2/models/m/infer"

    def published() -> list[dict[str, Any]]:
        found = cp.store.published(wire.PUBLISHED_KEY)
        return [] if found is None else [e for e in json.loads(found[1])["endpoints"] if e["site"] == "dc-1"]

    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        on = f"ray: {{address: '{dashboard.url}', serveUrl: '{proxy.url}'}}"
        applied = await http.post("/v1/apply", content=bundle(site("dc-1", on=on), MODEL, deployment("d", "dc-1")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(published()), 30, what="d's endpoint on dc-1")
        assert (await http.post("/v2/models/m/infer", json=INFER)).status_code == 200

        dashboard.stop()
        await harness.wait_until(lambda: "error" in site_status(cp, "dc-1"), 30, what="dc-1 out of reach")
        await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)
        assert site_status(cp, "dc-1")["health"] == "Unreachable"
        answered = await http.post("/v2/models/m/infer", json=INFER)
        assert answered.status_code == 200, answered.text
        assert proxy.requests.count(routed) == 2
        assert [e["url"] for e in published()] == [f"{proxy.url}/ep/dc-1/d/v"]
        [placed] = (await http.get("/v1/placements")).json()["items"]
        assert placed["state"] == "Unreachable" and "last observed" in placed["reason"], placed

        await harness.wait_until(lambda: not published(), 30, what="dc-1 declared lost and its endpoints gone")
        assert (await http.post("/v2/models/m/infer", json=INFER)).status_code == 503



def outage_of(cp: server.ControlPlane, name: str) -> dict[str, Any]:
    """What the leader last published it observed of data centre ``name`` ({}: nothing yet)."""
    found = cp.store.published(observed.PUBLISHED_KEY)
    return {} if found is None else json.loads(found[1])["datacentres"].get(name, {})


def routed_to(cp: server.ControlPlane, name: str) -> list[str]:
    """The endpoints of data centre ``name`` in the table the leader published."""
    found = cp.store.published(wire.PUBLISHED_KEY)
    return [] if found is None else [e["url"] for e in json.loads(found[1])["endpoints"] if e["site"] == name]


#: Declared lost 20 s after its outage began: time enough for a new leader to take over first.
LOST_AFTER = {"resync_s": 0.2, "heartbeat_interval_s": 0.5, "missed_heartbeats": 40}


async def out_of_reach(cp: server.ControlPlane, dashboard: ServeDashboard, proxy: ServeProxy) -> float:
    """dc-1 serving d, then its dashboard down: when the leader ``cp`` says its outage began."""
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        on = f"ray: {{address: '{dashboard.url}', serveUrl: '{proxy.url}'}}"
        applied = await http.post("/v1/apply", content=bundle(site("dc-1", on=on), MODEL, deployment("d", "dc-1")))
        assert applied.status_code == 200, applied.text
    await harness.wait_until(lambda: bool(routed_to(cp, "dc-1")), 30, what="d's endpoint on dc-1")
    dashboard.stop()
    await harness.wait_until(lambda: outage_of(cp, "dc-1").get("reachable") is False, 30, what="dc-1 out of reach")
    began = outage_of(cp, "dc-1")["unreachableAt"]
    assert isinstance(began, float), outage_of(cp, "dc-1")
    return began


async def routes_as_last_observed(cp: server.ControlPlane, proxy: ServeProxy, began: float) -> None:
    """The leader ``cp``, which did not lead when dc-1's outage began, routes to it as last
    observed, says so, and counts the outage from when it ``began``; then declares it lost."""
    await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)
    assert routed_to(cp, "dc-1") == [f"{proxy.url}/ep/dc-1/d/v"]
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        answered = await http.post("/v2/models/m/infer", json=INFER)
        assert answered.status_code == 200, answered.text
        [placed] = (await http.get("/v1/placements")).json()["items"]
        assert placed["state"] == "Unreachable" and "last observed" in placed["reason"], placed
    assert outage_of(cp, "dc-1")["unreachableAt"] == began, outage_of(cp, "dc-1")
    await harness.wait_until(lambda: not routed_to(cp, "dc-1"), 60, what="dc-1 declared lost and its endpoints gone")


@pytest.mark.parametrize("old_leader_behind_s", [0.0, 2 * 3600.0], ids=["clocks-in-sync", "old-leader-two-hours-behind"])
async def test_a_new_leader_routes_a_data_centre_out_of_reach_as_last_observed_until_the_old_ones_loss_time(
        tmp_path: pathlib.Path, postgres: PostgresServer, serve_site: tuple[ServeDashboard, ServeProxy], old_leader_behind_s: float) -> None:
    """The last observation lived in the leader's memory: a replica that took over during the
    outage had none, so its first pass dropped the data centre's endpoints from every gateway
    at once, and it counted the loss time again from its own first try. The new leader takes
    the last observation and when the outage began from what the old one published. When it
    began is on the store's time (the database server's clock): stamped by the old leader's
    own clock and compared with the new one's, a new leader a loss time ahead (two hours
    here) took the data centre for lost at its first pass."""
    dashboard, proxy = serve_site
    both = {"kube_factory": kuberay_on(kmock.KubernetesEmulator()), **LOST_AFTER}
    old_clock = {"wall": lambda: time.time() - old_leader_behind_s}
    async with harness.leader_and_follower(tmp_path, postgres.create_database(), both=both, **old_clock) as (fa, fb):
        assert fa.cp is not None and (b := fb.cp) is not None
        began = await out_of_reach(fa.cp, dashboard, proxy)
        await fa.stop()
        await harness.wait_until(lambda: b.elector is not None and b.elector.leading and b.reconciler.lease is not None, 30, what="b leads")
        await routes_as_last_observed(b, proxy, began)


async def test_a_control_plane_restarted_during_an_outage_routes_the_data_centre_as_last_observed(
        fleet: harness.Fleet, serve_site: tuple[ServeDashboard, ServeProxy]) -> None:
    dashboard, proxy = serve_site
    began = await out_of_reach(await fleet.start_control_plane(kube_factory=kuberay_on(kmock.KubernetesEmulator()), **LOST_AFTER),
                               dashboard, proxy)
    await fleet.stop()
    await routes_as_last_observed(await fleet.start_control_plane(kube_factory=kuberay_on(kmock.KubernetesEmulator()), **LOST_AFTER),
                                  proxy, began)



APP = serve_config.ServeAppSpec(name="ep-d.v.dc-1", route_prefix="/ep/dc-1/d/v", model_name="m", runtime="ray-serve", num_replicas=1,
                                import_path="pkg.mod:app")


class Leaders:
    """Data-centre syncs of successive leaders over one store and one cluster (dc-1), on
    clocks of the test's: each leader's own monotonic clock, one wall clock."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.cluster, self.wall = Cluster(), 1000.0
        self.cluster.running = {APP.name: APP}
        self.datacentres = dc_mod.DataCentres(dc_mod.LocalRay(), kube_factory=lambda name, spec, ownership: self.cluster)
        self.store = open_store(tmp_path / "state.db")
        self.sites = [snap.SiteRecord("dc-1", {}, schema.SiteSpec.model_validate(yaml.safe_load(site("dc-1"))["spec"]))]

    def leader(self, clock: list[float]) -> datacentre_sync.DataCentreSync:
        return datacentre_sync.DataCentreSync(self.store, self.datacentres, clock=lambda: clock[0], lease=lambda: None, lost_after=60.0,
                                              wall=lambda: self.wall)


async def test_a_leader_that_takes_over_mid_outage_declares_the_data_centre_lost_when_the_old_one_would_have(tmp_path: pathlib.Path) -> None:
    """The old leader finds the cluster out of reach at wall time 1000; 60 s make it lost.
    The new one takes over 50 s in: it routes as last observed, and 10 s later, not 60, it is lost."""
    fleet = Leaders(tmp_path)
    old = fleet.leader([5.0])
    await old.observe(fleet.sites)
    fleet.cluster.down = True
    await old.observe(fleet.sites)
    assert old.observed["dc-1"].unreachable_at == 1000.0

    fleet.wall += 50
    clock = [80000.0]
    new = fleet.leader(clock)
    new.inherit(observed.from_text(observed.to_text(observed.Observed(datacentres=old.observed))).datacentres)
    await new.observe(fleet.sites)
    first = new.observed["dc-1"]
    assert (first.reachable, first.lost, list(first.routed)) == (False, False, [APP.name]), first
    for _ in range(2):  # its retry is due at the loss time at the latest
        fleet.wall, clock[0] = fleet.wall + 5, clock[0] + 5
        await new.observe(fleet.sites)
    assert new.observed["dc-1"].lost and not new.observed["dc-1"].routed
    assert [e.action for e in fleet.store.events(kind="Site", name="dc-1", limit=100)].count("datacentre-error") == 1  # one outage


async def test_a_data_centre_an_earlier_versions_leader_found_out_of_reach_is_not_routed_as_last_observed(tmp_path: pathlib.Path) -> None:
    """Its document says not when the outage began: routed as last observed, one it had
    declared lost would be routed to again for a whole loss time."""
    fleet = Leaders(tmp_path)
    fleet.cluster.down = True
    running = serve_config.ServeAppStatus(APP.name, serve_config.ServeAppState.RUNNING, "", 1, 1, "http://127.0.0.1:9/ep/dc-1/d/v")
    new = fleet.leader([0.0])
    new.inherit({"dc-1": snap.DataCentreObservation(False, error="down", lost=True, last_apps={APP.name: running})})
    await new.observe(fleet.sites)
    assert not new.observed["dc-1"].routed


class Marked(Cluster):
    """A cluster another control plane may mark as its own (``other``): then observing it is
    refused as the adapters refuse it."""

    other: str | None = None

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        if self.other is not None:
            raise OwnedElsewhere("RayService ns/dc", "dc-1", self.other, "a" * 16)
        return await super().observe()


async def test_a_data_centre_given_back_that_then_goes_out_of_reach_is_given_the_whole_loss_time(tmp_path: pathlib.Path) -> None:
    """Another control plane's for longer than the loss time, the cluster answered all along:
    once given back and then out of reach, its outage begins then, not when it was first
    found another's, and it keeps its replicas (routed as last observed) for the loss time."""
    fleet = Leaders(tmp_path)
    fleet.cluster = Marked()
    fleet.cluster.running = {APP.name: APP}
    clock = [0.0]
    sync = fleet.leader(clock)
    await sync.observe(fleet.sites)
    fleet.cluster.other = "b" * 16
    await sync.observe(fleet.sites)
    assert sync.observed["dc-1"].owned_by == "b" * 16

    def tick() -> None:
        fleet.wall, clock[0] = fleet.wall + 5, clock[0] + 5

    while clock[0] < 120:  # twice the loss time: held, never lost
        tick()
        await sync.observe(fleet.sites)
        assert not sync.observed["dc-1"].lost
    fleet.cluster.other, fleet.cluster.down = None, True
    gone_at = None
    while gone_at is None or clock[0] - gone_at < 55:
        tick()
        await sync.observe(fleet.sites)
        if gone_at is None and sync.observed["dc-1"].owned_by is None:
            gone_at = clock[0]
        dc = sync.observed["dc-1"]
        assert (dc.reachable, dc.lost, list(dc.routed)) == (False, False, [APP.name]), (clock[0] - (gone_at or 0), dc)
    while clock[0] - gone_at < 65:
        tick()
        await sync.observe(fleet.sites)
    assert sync.observed["dc-1"].lost and not sync.observed["dc-1"].routed
