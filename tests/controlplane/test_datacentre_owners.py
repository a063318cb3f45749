"""Two control planes (two stores: staging and production, a copy restored beside its
original) given one data-centre site on one cluster: the second one takes nothing over and
says whose the cluster is; an operator's ``takeOverFrom`` takes it over; the first then stops
applying. Without the mark each applied its config over the other's at every pass, forever.
KubeRay sites are RayServices on kmock over real HTTP; Ray sites a Serve REST API (and Jobs
API) on loopback."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import pathlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import kmock
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import server
from orchestrator.cli import main as cli_main
from orchestrator.adapters import ray_owner, ray_serve, rayservice, serve_config
from orchestrator.testing import harness
from orchestrator.adapters.ownership import OwnedElsewhere, Ownership
from tests.controlplane.datacentres import (MODEL, RES, Cluster, ServeDashboard, bundle, deployment, kuberay_on, site,
                                            site_events, site_status)


@pytest.fixture
async def fleets(tmp_path: pathlib.Path) -> AsyncIterator[tuple[harness.Fleet, harness.Fleet]]:
    pair = harness.Fleet(tmp_path / "a"), harness.Fleet(tmp_path / "b")
    try:
        yield pair
    finally:
        for fleet in pair:
            await fleet.stop()


@pytest.fixture
def dashboard() -> Iterator[ServeDashboard]:
    dash = ServeDashboard()
    yield dash
    dash.stop()


async def apply(cp: server.ControlPlane, manifests: str) -> None:
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=manifests)
        assert applied.status_code == 200, applied.text


async def owned_elsewhere(cp: server.ControlPlane) -> dict[str, float]:
    """``edgeplane_datacentre_owned_elsewhere`` as ``cp``'s ``/metrics`` gives it, by site."""
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    return {s.labels["site"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "edgeplane_datacentre_owned_elsewhere" for s in f.samples}


async def refused_by(cp: server.ControlPlane, other: server.ControlPlane) -> str:
    """``cp`` says dc-1's cluster is ``other``'s, in its status and one event: the error."""
    owned = f"is owned by another edgeplane control plane (owner {other.store.store_id()}; this one is {cp.store.store_id()})"
    await harness.wait_until(lambda: owned in site_status(cp, "dc-1").get("error", ""), 30, what="dc-1 to be refused as another's")
    assert f"spec.takeOverFrom: {other.store.store_id()}" in site_status(cp, "dc-1")["error"]
    # it answers: not Unreachable, but another's, by the other's id
    assert (site_status(cp, "dc-1")["health"], site_status(cp, "dc-1")["ownedBy"]) == ("OwnedElsewhere", other.store.store_id())
    said = [reason for action, reason in site_events(cp, "dc-1") if owned in reason]
    assert len(said) == 1 and all(action != "serve-reapplied" for action, _ in site_events(cp, "dc-1")), site_events(cp, "dc-1")
    return said[0]


async def two_owners(fleets: tuple[harness.Fleet, harness.Fleet], on: str, factory: Any, marked: Callable[[], str | None],
                     state: Callable[[], Any], tries: Callable[[], int]) -> None:
    """The scenario on one cluster, through ``marked`` (the owner it names), ``state`` (what
    runs there) and ``tries`` (how many times it has been read)."""
    first = await fleets[0].start_control_plane(kube_factory=factory, resync_s=0.2)
    manifests = bundle(site("dc-1", on), MODEL, deployment("d", "dc-1"))
    await apply(first, manifests)
    await harness.wait_until(lambda: marked() == first.store.store_id() and bool(state()), 30, what="dc-1 applied and marked")

    second = await fleets[1].start_control_plane(kube_factory=factory, resync_s=0.2)
    await apply(second, bundle(site("dc-1", on), MODEL, deployment("d", "dc-1"), deployment("e", "dc-1")))
    await refused_by(second, first)
    assert await owned_elsewhere(second) == {"dc-1": 1.0} and await owned_elsewhere(first) == {"dc-1": 0.0}
    assert marked() == first.store.store_id() and "ep-e.v.dc-1" not in repr(state())  # nothing taken over, nor the second's applied

    taking = site("dc-1", on).replace("  tier: datacenter", f"  tier: datacenter\n  takeOverFrom: {first.store.store_id()}")
    await apply(second, bundle(taking, MODEL, deployment("d", "dc-1"), deployment("e", "dc-1")))
    await harness.wait_until(lambda: marked() == second.store.store_id() and "ep-e.v.dc-1" in repr(state()), 30, what="dc-1 taken over")
    await harness.wait_until(lambda: "error" not in site_status(second, "dc-1"), 30, what="the second's dc-1 status to clear")
    assert await owned_elsewhere(second) == {"dc-1": 0.0}

    await refused_by(first, second)  # the first sees it lost the cluster
    assert await owned_elsewhere(first) == {"dc-1": 1.0}
    await fleets[1].stop()  # what changes there from now on is the first's doing
    taken, read = copy.deepcopy(state()), tries()
    await harness.wait_until(lambda: tries() >= read + 2, 30, what="the first to try dc-1 again")
    assert (marked(), state()) == (second.store.store_id(), taken)  # no fight
    assert not any(action == "serve-reapplied" for action, _ in site_events(first, "dc-1"))


async def test_two_control_planes_on_one_kuberay_site(fleets: tuple[harness.Fleet, harness.Fleet], kube: kmock.KubernetesEmulator) -> None:
    key = (RES, "ns-dc-1", rayservice.rayservice_name("dc-1"))

    def rayservice_now() -> dict[str, Any] | None:
        if key not in kube.objects or kube.objects[key].deleted:
            return None
        return copy.deepcopy(dict(kube.objects[key].raw))

    def marked() -> str | None:
        return rayservice.owner_of(rayservice_now() or {})

    def state() -> Any:
        obj = rayservice_now()
        return obj and (obj["spec"], rayservice.spec_hash(obj))

    await two_owners(fleets, "", kuberay_on(kube), marked, state, lambda: sum(1 for r in list(kube) if str(r.method) == "method.GET"))


async def test_two_control_planes_on_one_ray_site(fleets: tuple[harness.Fleet, harness.Fleet], dashboard: ServeDashboard) -> None:
    await two_owners(fleets, f"ray: {{address: '{dashboard.url}'}}", None, lambda: ray_owner.marked_owner(dashboard.jobs, "dc-1"),
                     lambda: dict(dashboard.applications), lambda: dashboard.job_reads)


APP = serve_config.ServeAppSpec(name="ep-d.v.dc-1", route_prefix="/ep/dc-1/d/v", model_name="m", runtime="ray-serve", num_replicas=1,
                                import_path="app:build", deployment="Ingress")
OURS = Ownership(owner="a" * 16, site="dc-1")


@pytest.mark.parametrize("failing", [500, 503])
async def test_a_ray_site_whose_jobs_api_fails_is_read_as_before_and_changed_only_once_its_mark_reads(
        dashboard: ServeDashboard, failing: int) -> None:
    """The mark is read beside the Serve API, on the job manager: one that fails (a 500, a
    503) leaves the Serve API answering, and what runs there is observed as before, not the
    site Unreachable; nothing is written there until the mark reads again."""
    async with ray_serve.RayServeActuator(dashboard.url, ownership=OURS) as actuator:
        await actuator.apply([APP])
        running = copy.deepcopy(dashboard.applications)
        dashboard.jobs_failing = failing
        assert set(await actuator.observe()) == {APP.name}
        asked = dataclasses.replace(APP, num_replicas=2)
        with pytest.raises(serve_config.DataCentreError) as refused:
            await actuator.apply([asked])
        assert "/api/jobs/" in str(refused.value) and refused.value.retryable, str(refused.value)
        assert dashboard.applications == running  # nothing written
        dashboard.jobs_failing = None
        await actuator.apply([asked])
        assert dashboard.applications != running
    assert ray_owner.marked_owner(dashboard.jobs, "dc-1") == OURS.owner


async def test_a_ray_site_not_yet_marked_whose_jobs_api_fails_is_observed(dashboard: ServeDashboard) -> None:
    dashboard.jobs_failing = 500
    async with ray_serve.RayServeActuator(dashboard.url, ownership=OURS) as actuator:
        assert await actuator.observe() == {}


async def test_a_ray_site_is_listed_the_jobs_of_before_each_apply_and_at_most_every_recheck_when_observed(
        dashboard: ServeDashboard) -> None:
    """Ray's Jobs API lists every job the cluster ever ran, thousands on a busy one: its
    passes read the mark before every apply, which is what a takeover must stop, and once a
    recheck when observed, not at every observation; a takeover still stops the next apply."""
    now = [0.0]
    async with ray_serve.RayServeActuator(dashboard.url, ownership=OURS) as first, \
            ray_serve.RayServeActuator(dashboard.url, ownership=OURS, clock=lambda: now[0], owner_recheck_s=60.0) as timed:
        await first.apply([APP])
        assert dashboard.job_reads == 1
        for _ in range(5):
            await first.observe()
        assert dashboard.job_reads == 1
        await timed.observe()
        now[0] = 59.0
        await timed.observe()
        assert dashboard.job_reads == 2
        now[0] = 61.0
        await timed.observe()
        assert dashboard.job_reads == 3

        theirs = Ownership(owner="b" * 16, site="dc-1", take_over_from=OURS.owner)
        async with ray_serve.RayServeActuator(dashboard.url, ownership=theirs) as second:
            await second.apply([APP, dataclasses.replace(APP, name="ep-e.v.dc-1", route_prefix="/ep/dc-1/e/v")])
        taken = copy.deepcopy(dashboard.applications)
        with pytest.raises(OwnedElsewhere):
            await first.apply([APP])
        assert dashboard.applications == taken
        with pytest.raises(OwnedElsewhere):  # refused once: read again at the next observation
            await first.observe()


class Marked(Cluster):
    """A cluster whose applications another control plane may mark as its own (``other``):
    then each call is refused as the adapters refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.other: str | None = None

    async def observe(self) -> dict[str, serve_config.ServeAppStatus]:
        if self.other is not None:
            raise OwnedElsewhere("RayService ns/dc", "dc", self.other, "a" * 16)
        return dict(await super().observe())


async def said_by_the_cli(cp: server.ControlPlane, held: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``get sites`` (its table and ``-o json``) and ``describe site`` say whose ``held`` is."""
    def cli(*args: str) -> str:
        capsys.readouterr()
        assert cli_main.main(["--server", cp.http_url, *args]) == 0
        return capsys.readouterr().out

    table = await asyncio.to_thread(cli, "get", "sites")
    assert any(line.split()[0] == held and "OwnedElsewhere" in line.split() for line in table.splitlines()), table
    listed = json.loads(await asyncio.to_thread(cli, "get", "sites", "-o", "json"))
    status = next(o["status"] for o in listed["items"] if o["metadata"]["name"] == held)
    assert (status["health"], status["ownedBy"]) == ("OwnedElsewhere", "b" * 16), status
    described = await asyncio.to_thread(cli, "describe", "site", held)
    assert "health: OwnedElsewhere" in described and f"ownedBy: {'b' * 16}" in described, described


async def test_a_site_owned_elsewhere_keeps_its_replicas_past_its_loss_time_and_takes_no_new_ones(
        fleets: tuple[harness.Fleet, harness.Fleet], capsys: pytest.CaptureFixture[str]) -> None:
    """A site another control plane took over answers, to it: it is not lost (its replicas
    moved elsewhere, and back once it is given back), nor open to new replicas this control
    plane could not apply there. It holds what it holds, as a cordoned site does, for as
    long as it is another's, past the time an out-of-reach one is declared lost in."""
    clusters = {"dc-1": Marked(), "dc-2": Marked()}
    cp = await fleets[0].start_control_plane(kube_factory=lambda name, spec, ownership: clusters[name], resync_s=0.2)
    await apply(cp, bundle(site("dc-1"), site("dc-2"), MODEL, deployment("d")))

    def rows() -> set[tuple[str, str, int]]:
        return {(r.deployment, r.site, r.replicas) for r in cp.store.placements()}

    await harness.wait_until(lambda: any(c.running for c in clusters.values()), 30, what="d applied")
    held = next(name for name, c in clusters.items() if c.running)
    placed, passes = rows(), cp.reconciler.passes
    clusters[held].other = "b" * 16
    await harness.wait_until(lambda: site_status(cp, held).get("health") == "OwnedElsewhere", 30, what=f"{held} another's")
    assert site_status(cp, held)["ownedBy"] == "b" * 16 and "b" * 16 in site_status(cp, held)["error"]
    await said_by_the_cli(cp, held, capsys)
    # well past the loss time (three missed heartbeats of 0.5 s): held, not lost
    await cp.reconciler.wait_for_pass(passes + 20)
    assert rows() == placed and site_status(cp, held)["health"] == "OwnedElsewhere"
    assert not any(c.running for name, c in clusters.items() if name != held)
    assert await owned_elsewhere(cp) == {held: 1.0, ({"dc-1", "dc-2"} - {held}).pop(): 0.0}

    await apply(cp, deployment("e", held))  # only there: it waits, not placed where nothing can be applied
    await cp.reconciler.wait_for_pass(cp.reconciler.passes + 3)
    assert not any(r.deployment == "e" for r in cp.store.placements())
    assert f"are owned by another control plane ({held} by {'b' * 16}); such a site takes no new deployment until the Site's " \
           "spec.takeOverFrom takes it over" in cp.store.get("ModelDeployment", "e").status["reason"]  # type: ignore[union-attr]
    assert "ep-e" not in repr(clusters[held].running)

    clusters[held].other = None  # given back: healthy, nothing moved back or again
    await harness.wait_until(lambda: site_status(cp, held).get("health") == "Healthy", 30, what=f"{held} ours again")
    await harness.wait_until(lambda: ("e", held, 1) in rows(), 30, what="e placed once it is ours")
    assert rows() == placed | {("e", held, 1)}
    moved = [e for e in cp.store.events(kind="ModelDeployment", name="d", limit=1000) if e.action.startswith("replica-") and e.action != "replica-placed"]
    assert not moved, moved
