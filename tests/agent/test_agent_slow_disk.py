"""An agent whose disk is slow to sync (an SD card, a disk busy with a large download, a
network volume) while it saves what it keeps across restarts: a new assignment set, the
identity the control plane issued, its client certificate and key. Each save ends in fsync, which may take seconds there;
made on the agent's event loop, it held every inference request, health probe and heartbeat
meanwhile. The disk here is a stand-in whose save waits until the test lets it go, after a
probe from another thread asked the agent's liveness: a loop held by the save never answers."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import threading
from typing import Any

from edge_agent import assignments, daemon, state, tls
from edgeplane_proto import identity
from orchestrator.testing import harness, stall

from .conftest import SITE, ControlPlane, MakeAgent


class SlowDisk(state.StateStore):
    """Saves that wait, once ``slow`` is set, until ``synced`` is (at most 30 s), as an fsync
    on a slow disk does; ``saving`` says one began."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        super().__init__(data_dir)
        self.slow, self.saving, self.synced = threading.Event(), threading.Event(), threading.Event()

    def _sync(self) -> None:
        if self.slow.is_set():
            self.saving.set()
            self.synced.wait(30)

    def save_assignments(self, site: str, desired: assignments.AssignmentSet) -> None:
        self._sync()
        super().save_assignments(site, desired)

    def save_identity(self, identity: state.Identity) -> None:
        self._sync()
        super().save_identity(identity)


@dataclasses.dataclass(frozen=True)
class SlowCertificates(tls.AgentTls):
    """The agent's mutual-TLS material, whose key and certificate saves wait as
    :class:`SlowDisk`'s do."""

    slow: threading.Event = dataclasses.field(default_factory=threading.Event, compare=False)
    saving: threading.Event = dataclasses.field(default_factory=threading.Event, compare=False)
    synced: threading.Event = dataclasses.field(default_factory=threading.Event, compare=False)

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.slow.is_set():
            self.saving.set()
            self.synced.wait(30)
        super().save(*args, **kwargs)


def live_url(agent_url: str) -> str:
    return f"{agent_url}/v2/health/live"


async def test_an_assignment_set_saved_on_a_slow_disk_leaves_the_agent_answering(
        control_plane: ControlPlane, make_agent: MakeAgent, tmp_path: pathlib.Path) -> None:
    disk = SlowDisk(tmp_path / SITE)
    agent = await make_agent(control_plane, state_store=disk)
    await harness.wait_until(lambda: (s := control_plane.hub.status(SITE)) is not None and s.reported, 30, what="agent joined")
    disk.slow.set()
    control_plane.hub.set_assignments(SITE, [], version=7)
    [live] = await stall.probe([live_url(agent.endpoint_url)], within=3, once=disk.saving, then=disk.synced.set)
    assert disk.saving.is_set(), "the agent never saved the assignment set"
    assert live == 200, "the agent answered nothing while it saved an assignment set"
    await harness.wait_until(lambda: agent.assignment_version() == 7, 30, what="the set acted on once saved")
    assert json.loads((tmp_path / SITE / "state.json").read_text())["assignments"]["version"] == 7


async def test_an_identity_saved_on_a_slow_disk_leaves_the_agent_answering(
        control_plane: ControlPlane, make_agent: MakeAgent, tmp_path: pathlib.Path) -> None:
    disk = SlowDisk(tmp_path / SITE)
    disk.slow.set()  # from the first join on, whose identity is saved
    agent = await make_agent(control_plane, state_store=disk)
    [live] = await stall.probe([live_url(agent.endpoint_url)], within=3, once=disk.saving, then=disk.synced.set)
    assert disk.saving.is_set(), "the agent never saved its identity"
    assert live == 200, "the agent answered nothing while it saved its identity"
    await harness.wait_until(lambda: (s := control_plane.hub.status(SITE)) is not None and s.reported, 30, what="agent joined")
    assert disk.load_identity(SITE) is not None


async def test_a_certificate_saved_on_a_slow_disk_at_enrolment_and_renewal_leaves_the_agent_answering(
        tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    agent = None
    try:
        cp = await fleet.start_control_plane(agent_cert_ttl_s=9.0)  # renewed about 6 s in
        assert cp.ca_file is not None
        data_dir = tmp_path / "agent"
        material = SlowCertificates(data_dir, cp.agent_join_target, cp.ca_file)
        material.slow.set()  # from the enrolment on
        agent = daemon.Agent(daemon.AgentConfig(
            control_plane=cp.agent_target, site=SITE, token=harness.BOOTSTRAP_TOKEN, data_dir=data_dir, listen_port=0,
            heartbeat_interval=0.5, ca_file=cp.ca_file, join_address=cp.agent_join_target, workers=1, country="FR",
            lat=48.8, lon=2.3), agent_tls=material)
        await agent.start()
        [live] = await stall.probe([live_url(agent.endpoint_url)], within=3, once=material.saving, then=material.synced.set)
        assert material.saving.is_set(), "the agent never saved its enrolment's certificate"
        assert live == 200, "the agent answered nothing while it saved its enrolment's certificate"
        await harness.wait_until(lambda: (s := cp.hub.status(SITE)) is not None and s.reported, 30, what="agent joined")
        first = material.cert_path.read_bytes()

        material.saving.clear()
        material.synced.clear()
        [live] = await stall.probe([live_url(agent.endpoint_url)], within=3, once=material.saving, then=material.synced.set)
        assert material.saving.is_set(), "the agent never saved a renewed certificate"
        assert live == 200, "the agent answered nothing while it saved a renewed certificate"
        await harness.wait_until(lambda: material.cert_path.read_bytes() != first, 30, interval=0.1, what="the renewal saved")
        assert identity.site_of(material.cert_path.read_bytes()) == SITE
    finally:
        if agent is not None:
            await agent.stop()
        await fleet.stop()
