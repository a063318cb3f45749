"""Helpers for the control-plane tests that drive a reconciler pass by pass.

The agents are joined to a real ``AgentHub`` in-process, not run: a pass sees them as an
operator's fleet that has just come up, which is all a test of what a pass writes needs.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod


def reconciler_with_agents(store: store_mod.Store, sites: Sequence[str], artifacts: pathlib.Path,
                           datacentres: dc_mod.DataCentres | None = None) -> tuple[hub_mod.AgentHub, loop.Reconciler]:
    """A hub with one agent joined on each of ``sites`` (4 cores, 8 GiB), each having sent one
    heartbeat with nothing loaded and no assignment set yet, and a reconciler over it and
    ``store`` that serves the artifacts in folder ``artifacts`` and drives ``datacentres``
    (by default, through the kubeconfig of the machine)."""
    hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), heartbeat_interval=1.0)
    for s in sites:
        agent_id = hub.join(agent_model.JoinApplication(
            s, "tok", None, "", f"http://{s}:8081", agent_model.Location(), {}, "test", 1.0,
            agent_model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30))).agent_id
        hub.record_heartbeat(s, agent_id, agent_model.Heartbeat(
            seq=1, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30, assignment_version=0,
            draining=False, capacity=None, models=None, gpu_free_bytes=()))
    reconciler = loop.Reconciler(store, hub, datacentres or dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((artifacts,), "http://cp"), endpoints_mod.EndpointTable())
    return hub, reconciler
