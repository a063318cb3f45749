"""Agents' joins, losses and recoveries wait to be logged while the store stalls. A fleet
whose agents flap during a long stall must not queue them without end (each event holds the
agent's whole status): past a bound, a site's newer loss or recovery takes the place of its
older one, which is counted, so that the log ends on each agent's latest state; joins are
always kept (logging one registers its Site), and the count is logged once the store has
caught up, or while it has not, every so often."""

from __future__ import annotations

import logging
import pathlib
import threading
import tracemalloc
from collections.abc import Sequence

import pytest

from orchestrator import server, server_config
from orchestrator.agents import backlog, model
from orchestrator.testing import harness

LIMIT = 20


async def logging_on_a_stalled_store(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                     stalled: threading.Event) -> server.ControlPlane:
    """A control plane whose backlog holds ``LIMIT`` events and whose logging of agents'
    events waits on the store until ``stalled`` is set."""
    monkeypatch.setattr(backlog, "LIMIT", LIMIT)
    # the control plane's private step that logs agents' events, stood in to wait: it is
    # the one write these tests stall, and the control plane takes no seam for it
    log_events = server.ControlPlane._log_agent_event

    def on_a_stalled_store(self: server.ControlPlane, events: Sequence[model.AgentEvent]) -> None:
        stalled.wait(30)
        log_events(self, events)

    monkeypatch.setattr(server.ControlPlane, "_log_agent_event", on_a_stalled_store)
    config = server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, agent_join_port=0, heartbeat_interval_s=60.0,
                                        bootstrap_tokens=(harness.BOOTSTRAP_TOKEN,))
    return await server.ControlPlane(config).start()


def events_waiting(cp: server.ControlPlane) -> int:
    """How many agents' events wait to be logged. Read from the control plane's private
    backlog: nothing public shows it, and the tests watch it stay bounded, then drain."""
    return cp._agent_events.qsize()


def beat(seq: int, draining: bool) -> model.Heartbeat:
    return model.Heartbeat(seq=seq, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30, assignment_version=0,
                           draining=draining, capacity=None, models=None, gpu_free_bytes=())


async def test_a_flapping_agent_during_a_stall_queues_a_bounded_number_of_events_and_its_join_is_logged(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    stalled = threading.Event()
    cp = await logging_on_a_stalled_store(tmp_path, monkeypatch, stalled)
    try:
        agent_id = cp.hub.join(model.JoinApplication(
            site="edge-1", bootstrap_token=harness.BOOTSTRAP_TOKEN, credential=None, agent_id="", endpoint_url="http://127.0.0.1:9",
            location=model.Location("FR", "eu-west", 48.8, 2.3), labels={}, agent_version="test", heartbeat_interval=60.0,
            capacity=model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",)))).agent_id
        for seq in range(1, 401):  # 200 losses and 200 recoveries while the first event waits on the store
            cp.hub.record_heartbeat("edge-1", agent_id, beat(seq, draining=seq % 2 == 1))
        assert events_waiting(cp) <= LIMIT
        with caplog.at_level(logging.WARNING, logger="orchestrator"):
            stalled.set()
            await harness.wait_until(lambda: not events_waiting(cp) and any(
                "were not logged" in r.getMessage() for r in caplog.records), 30, what="the backlog drained")
        assert cp.store.get("Site", "edge-1") is not None  # the join was logged, its Site registered
        logged = [e.action for e in cp.store.events(kind="Site", name="edge-1", limit=1000)]
        flaps = [a for a in logged if a in ("agent-lost", "agent-recovered")]
        assert logged[0] == "agent-joined" and len(flaps) <= LIMIT
        [warning] = [r.getMessage() for r in caplog.records if "were not logged" in r.getMessage()]
        assert warning.startswith(f"{400 - len(flaps)} agent losses and recoveries were not logged")
    finally:
        stalled.set()
        await cp.stop()


async def test_each_agent_s_latest_loss_or_recovery_is_logged_however_many_waited(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """edge-1 flaps 400 times during a stall and ends healthy; edge-2 is lost while the backlog
    is full. The log must not end on edge-1 lost, nor leave out edge-2's loss."""
    stalled = threading.Event()
    cp = await logging_on_a_stalled_store(tmp_path, monkeypatch, stalled)
    try:
        ids = {site: cp.hub.join(harness.join_application(site)).agent_id for site in ("edge-1", "edge-2")}
        for seq in range(1, 401):
            cp.hub.record_heartbeat("edge-1", ids["edge-1"], beat(seq, draining=seq % 2 == 1))
        cp.hub.record_heartbeat("edge-2", ids["edge-2"], beat(1, draining=True))
        assert cp.hub.status("edge-1").healthy and not cp.hub.status("edge-2").healthy  # type: ignore[union-attr]
        stalled.set()
        await harness.wait_until(lambda: not events_waiting(cp), 30, what="the backlog drained")

        def flaps(site: str) -> list[str]:  # oldest first
            return [e.action for e in cp.store.events(kind="Site", name=site, limit=1000) if e.action in ("agent-lost", "agent-recovered")]
        assert flaps("edge-1")[-1] == "agent-recovered" and len(flaps("edge-1")) <= LIMIT
        assert flaps("edge-2") == ["agent-lost"]
    finally:
        stalled.set()
        await cp.stop()


def event(site: str, kind: model.AgentEventKind, status: model.AgentStatus) -> model.AgentEvent:
    return model.AgentEvent(kind, site, "agent", 0.0, "", status)


async def test_events_not_logged_are_reported_once_the_backlog_drains_below_half_or_every_so_often_while_it_does_not() -> None:
    """A fleet that goes on flapping while the store lags never lets the backlog empty."""
    status = model.AgentStatus("edge", "agent", "http://127.0.0.1:9", True, 0.0, 0.0, model.Location(), {}, "test",
                               model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30), (), 0, 1.0, 8 << 30, {}, 0, 60.0)
    now = [0.0]
    waiting = backlog.EventBacklog(10, clock=lambda: now[0], report_every_s=60.0)
    kinds = (model.AgentEventKind.LOST, model.AgentEventKind.RECOVERED)
    for i in range(10):
        assert waiting.put(event(f"edge-{i}", kinds[0], status))
    assert not waiting.put(event("edge-0", kinds[1], status))  # in the place of edge-0's loss: its pass runs now
    assert waiting.qsize() == 10 and waiting.take_dropped() == 0  # still over half
    now[0] = 61.0
    assert waiting.take_dropped() == 1  # reported while it still is
    assert not waiting.put(event("edge-1", kinds[1], status))
    got = [await waiting.get() for _ in range(6)]
    assert [(e.site, e.kind) for e in got] == [(f"edge-{i}", kinds[0]) for i in range(2, 8)]  # edge-0 and edge-1's losses replaced
    assert waiting.take_dropped() == 1  # below half: reported though not empty
    assert [(e.site, e.kind) for e in [await waiting.get() for _ in range(4)]] == [
        ("edge-8", kinds[0]), ("edge-9", kinds[0]), ("edge-0", kinds[1]), ("edge-1", kinds[1])]
    assert waiting.qsize() == 0 and waiting.take_dropped() == 0


async def test_what_waits_stays_bounded_in_memory_however_long_a_fleet_flaps_while_nothing_is_taken() -> None:
    """150 agents flapping 200,000 times past a limit of 100: each replaced event must free its
    place, not leave a blank one behind for every flap."""
    status = model.AgentStatus("edge", "agent", "http://127.0.0.1:9", True, 0.0, 0.0, model.Location(), {}, "test",
                               model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30), (), 0, 1.0, 8 << 30, {}, 0, 60.0)
    waiting = backlog.EventBacklog(100)
    kinds = (model.AgentEventKind.LOST, model.AgentEventKind.RECOVERED)
    flaps = [event(f"edge-{i}", kind, status) for kind in kinds for i in range(150)]
    tracemalloc.start()
    try:
        for n in range(200_000):
            waiting.put(flaps[n % len(flaps)])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert waiting.qsize() == 150
    assert held < 1 << 20  # about 56 bytes an entry: 200,000 blanks would hold some 11 MB
    got = [await waiting.get() for _ in range(150)]
    assert {e.site for e in got} == {f"edge-{i}" for i in range(150)} and waiting.qsize() == 0
