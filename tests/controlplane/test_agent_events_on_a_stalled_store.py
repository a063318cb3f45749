"""Agents' joins, losses and recoveries wait to be logged while the store stalls. A fleet
whose agents flap during a long stall must not queue them without end (each event holds the
agent's whole status): past a bound, losses and recoveries are counted rather than kept,
joins always are (logging one registers its Site), and the count is logged once the store
has caught up."""

from __future__ import annotations

import logging
import pathlib
import threading

import pytest

from orchestrator import server, server_config
from orchestrator.agents import backlog
from orchestrator.agents import model
from orchestrator.testing import harness

LIMIT = 20


def beat(seq: int, draining: bool) -> model.Heartbeat:
    return model.Heartbeat(seq=seq, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30, assignment_version=0,
                           draining=draining, capacity=None, models=None, gpu_free_bytes=())


async def test_a_flapping_agent_during_a_stall_queues_a_bounded_number_of_events_and_its_join_is_logged(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backlog, "LIMIT", LIMIT)
    stalled = threading.Event()
    log_event = server.ControlPlane._log_agent_event

    def on_a_stalled_store(self: server.ControlPlane, event: model.AgentEvent) -> None:
        stalled.wait(30)
        log_event(self, event)

    monkeypatch.setattr(server.ControlPlane, "_log_agent_event", on_a_stalled_store)
    config = server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, agent_join_port=0, heartbeat_interval_s=60.0,
                                        bootstrap_tokens=(harness.BOOTSTRAP_TOKEN,))
    cp = await server.ControlPlane(config).start()
    try:
        agent_id = cp.hub.join(model.JoinApplication(
            site="edge-1", bootstrap_token=harness.BOOTSTRAP_TOKEN, credential=None, agent_id="", endpoint_url="http://127.0.0.1:9",
            location=model.Location("FR", "eu-west", 48.8, 2.3), labels={}, agent_version="test", heartbeat_interval=60.0,
            capacity=model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",)))).agent_id
        for seq in range(1, 401):  # 200 losses and 200 recoveries while the first event waits on the store
            cp.hub.record_heartbeat("edge-1", agent_id, beat(seq, draining=seq % 2 == 1))
        assert cp._agent_events.qsize() <= LIMIT
        with caplog.at_level(logging.WARNING, logger="orchestrator"):
            stalled.set()
            await harness.wait_until(lambda: not cp._agent_events.qsize() and any(
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
