"""An edge site back from a loss, within its hold-down, drops and returns between two passes:
the leader finds it healthy at both, yet it flapped, so the hold-down starts over (the
agent's ``healthy_since`` moved, whether it joined again or its heartbeats resumed). A site
whose agent only opened a new session while it was live (a dropped connection) did not
flap: its hold-down goes on and its replica moves back on time. A real hub and store, on a
clock the test moves."""

from __future__ import annotations

import pathlib

import pytest

from orchestrator import catalog
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import loop
from orchestrator.store import open_store
from orchestrator.testing import manifests

from .test_failback_memory import AFTER_S, EPOCH, SITES, Fleet, placed


class Site:
    """The fleet of ``test_failback_memory``, its reconciler on one store."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        artifact = tmp_path / "intent.onnx"
        artifact.write_bytes(b"an onnx model")
        self.fleet = Fleet()
        self.store = open_store(str(tmp_path / "state.db"), clock=lambda: EPOCH + self.fleet.now)
        catalog.apply_documents(self.store, loader.load_text(manifests.bundle(
            *(manifests.edge_site(site, "FR", lat, 2.35, region="fr") for site, lat in SITES.items()),
            manifests.onnx_model("intent", artifact.name, artifacts_mod.sha256_file(artifact)),
            manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))), actor="test")
        self.reconciler: loop.Reconciler = self.fleet.reconciler(self.store, tmp_path)

    def lose(self, site: str, *others: str) -> None:
        """``site``'s heartbeats stop until the hub's sweep finds it lost."""
        for _ in range(40):
            self.fleet.beat(*others)
            self.fleet.hub.sweep()
        status = self.fleet.hub.status(site)
        assert status is not None and not status.healthy

    async def lose_and_come_back(self) -> tuple[str, str, float]:
        """The replica's site lost, its replica moved to the other, the site back: (home, other, when back)."""
        for site in SITES:
            self.fleet.join(site)
        await self.reconciler.reconcile_once()
        (home,) = placed(self.store)
        (other,) = set(SITES) - {home}
        self.lose(home, other)
        await self.reconciler.reconcile_once()
        assert placed(self.store) == {other}
        return home, other, self.fleet.now


@pytest.mark.parametrize("returns", ["joins again", "heartbeats resume"])
async def test_a_site_that_drops_and_returns_between_two_passes_starts_its_hold_down_over(tmp_path: pathlib.Path, returns: str) -> None:
    fleet = Site(tmp_path)
    try:
        home, other, _ = await fleet.lose_and_come_back()
        fleet.fleet.join(home)
        await fleet.reconciler.reconcile_once()  # back: its hold-down begins
        fleet.fleet.beat(home, other)
        await fleet.reconciler.reconcile_once()
        assert placed(fleet.store) == {other}

        fleet.lose(home, other)  # between two passes: lost ...
        if returns == "joins again":  # ... and back
            fleet.fleet.join(home)
        else:
            fleet.fleet.beat(home, other)
        assert fleet.fleet.hub.status(home).healthy  # type: ignore[union-attr]
        flapped = fleet.fleet.now
        await fleet.reconciler.reconcile_once()  # healthy, as at the pass before
        assert placed(fleet.store) == {other}

        while fleet.fleet.now - flapped < AFTER_S - 0.5:  # past the first hold-down's end, not the second's
            fleet.fleet.beat(home, other)
            await fleet.reconciler.reconcile_once()
            assert placed(fleet.store) == {other}, f"the replica moved back {fleet.fleet.now - flapped:.1f} s after the site flapped"
        while fleet.fleet.now - flapped < AFTER_S + 0.5:
            fleet.fleet.beat(home, other)
        await fleet.reconciler.reconcile_once()
        assert placed(fleet.store) == {home, other}, "the replica was not moved back a hold-down after the flap"
    finally:
        await fleet.reconciler.publishes_done()
        fleet.store.close()


async def test_an_agent_that_opens_a_new_session_while_live_does_not_restart_the_hold_down(tmp_path: pathlib.Path) -> None:
    fleet = Site(tmp_path)
    try:
        home, other, _ = await fleet.lose_and_come_back()
        grant = fleet.fleet.hub.join(agent_model.JoinApplication(
            home, "tok", None, "", f"http://{home}:8090", agent_model.Location("FR", "fr", SITES[home], 2.35), {}, "test", 0.5,
            agent_model.Capacity(cpu_cores=2, memory_total_bytes=8 << 30)))
        fleet.fleet.ids[home] = grant.agent_id
        fleet.fleet.beat(home, other)
        back = fleet.fleet.now
        await fleet.reconciler.reconcile_once()  # back: its hold-down begins
        fleet.fleet.beat(home, other)
        await fleet.reconciler.reconcile_once()

        fleet.fleet.hub.join(agent_model.JoinApplication(  # a dropped connection: the same agent, still live, joins again
            home, "", grant.credential, grant.agent_id, f"http://{home}:8090", agent_model.Location("FR", "fr", SITES[home], 2.35),
            {}, "test", 0.5, agent_model.Capacity(cpu_cores=2, memory_total_bytes=8 << 30)))
        fleet.fleet.beat(home, other)
        await fleet.reconciler.reconcile_once()
        assert placed(fleet.store) == {other}

        while fleet.fleet.now - back < AFTER_S:
            fleet.fleet.beat(home, other)
        await fleet.reconciler.reconcile_once()
        assert placed(fleet.store) == {home, other}, "the replica was not moved back a hold-down after the site came back"
        assert [e.name for e in fleet.store.recent_events(kind="Site") if e.action == "failback"] == [home]
    finally:
        await fleet.reconciler.publishes_done()
        fleet.store.close()

