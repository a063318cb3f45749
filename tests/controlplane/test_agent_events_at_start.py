"""An agent that rejoins a restarting control plane early, while start() is still stopping
the Ray cluster a killed control plane left (about a second), reaches the agent event
handler before the reconciler exists: that must be no error (the hub logged a traceback
for each such event), since the reconciler's first pass sees every agent joined by then."""

from __future__ import annotations

import pathlib
import types

from orchestrator import server
from orchestrator.agents import model as agent_model


def test_an_agent_event_before_the_reconciler_exists_is_no_error(tmp_path: pathlib.Path) -> None:
    cp = server.ControlPlane(server.ServerConfig(data_dir=tmp_path))
    assert not hasattr(cp, "reconciler")  # start() has not made it yet
    for kind in agent_model.AgentEventKind:
        # relayed by another replica: the event log is that replica's to write
        cp._agent_event(agent_model.AgentEvent(kind, "edge-a", "agt-1", 0.0, "test", types.SimpleNamespace(via="replica-2")))
