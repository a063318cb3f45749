"""Draining a data centre whose cluster does not answer: its replicas are placed elsewhere
(each leaving once its replacement serves, as on any draining site, or at once once the site
is declared lost), but the site is not ``Drained`` while its Serve
applications may still run there. It is once they are seen removed (the cluster answers
again and is cleared), or once it has been out of reach as long as an agent is given before
it is declared lost; the site's status says which, and why it waits meanwhile. The control
plane is restarted while the cluster is down, so it holds no memory of what it applied
there: what it reports must not rest on that."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from orchestrator import server
from orchestrator.adapters import serve_config
from orchestrator.testing import harness
from tests.controlplane.datacentres import MODEL, Cluster, bundle, deployment, site, site_status


def maintenance(cp: server.ControlPlane, name: str) -> Mapping[str, Any]:
    return site_status(cp, name).get("maintenance") or {}


async def drained_while_down(fleet: harness.Fleet, heartbeat_interval_s: float) -> tuple[server.ControlPlane, Cluster, Cluster]:
    """``d`` runs on dc-a; dc-a's cluster goes down, the control plane restarts (with agents
    declared lost after 3 × ``heartbeat_interval_s``), and dc-a is drained. Returns once
    ``d`` runs on dc-b and nothing is placed on dc-a."""
    clusters = {"dc-a": Cluster(), "dc-b": Cluster()}
    factory = lambda name, spec, ownership: clusters[name]  # noqa: E731
    cp = await fleet.start_control_plane(kube_factory=factory, resync_s=0.2)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-a"), MODEL, deployment("d")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(clusters["dc-a"].running), 30, what="d running on dc-a")
        assert (await http.post("/v1/apply", content=site("dc-b"))).status_code == 200
    await fleet.stop()
    clusters["dc-a"].down = True
    cp = await fleet.start_control_plane(kube_factory=factory, resync_s=0.2, heartbeat_interval_s=heartbeat_interval_s)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/sites/dc-a/drain")).status_code == 200
    await harness.wait_until(lambda: bool(clusters["dc-b"].running) and maintenance(cp, "dc-a").get("replicasLeft") == 0, 30,
                             what="d placed on dc-b and nothing left on dc-a")
    return cp, clusters["dc-a"], clusters["dc-b"]


async def test_a_drained_data_centre_that_does_not_answer_is_drained_once_its_applications_are_seen_removed(
        fleet: harness.Fleet) -> None:
    cp, down, _ = await drained_while_down(fleet, heartbeat_interval_s=60.0)  # not declared lost within the test
    await harness.wait_until(lambda: "cannot reach the cluster" in maintenance(cp, "dc-a").get("note", "")
                             or maintenance(cp, "dc-a").get("state") == "Drained", 10, what="dc-a's status to say it waits for its cluster")
    m = maintenance(cp, "dc-a")
    assert m["state"] == "Draining" and "not seen removed" in m["note"], m
    assert down.running  # still there, as the status says
    down.down = False
    await harness.wait_until(lambda: maintenance(cp, "dc-a").get("state") == "Drained", 30, what="dc-a drained")
    assert down.running == {}
    assert "note" not in maintenance(cp, "dc-a")


async def test_a_drained_data_centre_out_of_reach_as_long_as_a_lost_agent_is_drained_and_says_so(
        fleet: harness.Fleet) -> None:
    cp, down, _ = await drained_while_down(fleet, heartbeat_interval_s=0.5)  # lost after 1.5 s out of reach
    await harness.wait_until(lambda: maintenance(cp, "dc-a").get("state") == "Drained", 30, what="dc-a drained")
    note = maintenance(cp, "dc-a").get("note", "")
    assert "cannot reach the cluster" in note and "declared lost" in note, note
    assert down.running  # nothing could remove them; they are once it answers
    down.down = False
    await harness.wait_until(lambda: not down.running, 30, what="dc-a's applications removed once it answers")


class Refusing(Cluster):
    """A cluster that answers but refuses what is applied while ``refusing`` (a Serve config
    it rejects, say): what it ran before runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = False
        self.refused = 0

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        if self.refusing:
            self.refused += 1
            raise serve_config.DataCentreError("the Serve config is refused: 422 Unprocessable Entity")
        return await super().apply(apps)


async def test_a_drained_data_centre_that_refuses_the_apply_is_draining_while_its_applications_run(
        fleet: harness.Fleet) -> None:
    """The refusal is no outage: the cluster is observed meanwhile, and the site is not
    taken for lost while what it was told to remove is seen running."""
    refusing, other = Refusing(), Cluster()
    clusters = {"dc-a": refusing, "dc-b": other}
    cp = await fleet.start_control_plane(kube_factory=lambda name, spec, ownership: clusters[name], resync_s=0.2)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-a"), MODEL, deployment("d")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(refusing.running), 30, what="d running on dc-a")
        assert (await http.post("/v1/apply", content=site("dc-b"))).status_code == 200
        refusing.refusing = True
        assert (await http.post("/v1/sites/dc-a/drain")).status_code == 200
    # through two backoffs: what the site reports while the apply waits
    await harness.wait_until(lambda: bool(other.running) and (refusing.refused >= 3 or maintenance(cp, "dc-a").get("state") == "Drained"),
                             30, what="d on dc-b and dc-a's apply retried")
    m = maintenance(cp, "dc-a")
    assert m["state"] == "Draining" and m["replicasLeft"] == 0 and "declared lost" not in m.get("note", ""), m
    assert "422" in site_status(cp, "dc-a").get("error", ""), site_status(cp, "dc-a")  # why it waits
    refusing.refusing = False
    await harness.wait_until(lambda: maintenance(cp, "dc-a").get("state") == "Drained", 30, what="dc-a drained")
    assert refusing.running == {}


async def test_a_data_centre_drained_then_powered_off_stays_drained(fleet: harness.Fleet) -> None:
    """Its applications were seen removed before it stopped answering: nothing says they
    came back, and the site is not taken to serve them again until it is declared lost."""
    clusters = {"dc-a": Cluster(), "dc-b": Cluster()}
    cp = await fleet.start_control_plane(kube_factory=lambda name, spec, ownership: clusters[name], resync_s=0.2,
                                         heartbeat_interval_s=60.0)  # not declared lost within the test
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-a"), MODEL, deployment("d")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(clusters["dc-a"].running), 30, what="d running on dc-a")
        assert (await http.post("/v1/apply", content=site("dc-b"))).status_code == 200
        assert (await http.post("/v1/sites/dc-a/drain")).status_code == 200
    await harness.wait_until(lambda: maintenance(cp, "dc-a").get("state") == "Drained", 30, what="dc-a drained")
    assert clusters["dc-a"].running == {}
    clusters["dc-a"].down = True
    await harness.wait_until(lambda: "cannot reach the cluster" in maintenance(cp, "dc-a").get("note", ""), 30,
                             what="dc-a's status to say its cluster does not answer")
    m = maintenance(cp, "dc-a")
    assert m["state"] == "Drained" and "seen removed before" in m["note"], m
