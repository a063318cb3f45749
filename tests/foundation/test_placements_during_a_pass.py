"""`GET /v1/placements` while a pass is still executing: the rows it has written are shown
with the snapshot that pass planned from, not with the previous pass's. A first apply's
pass can take seconds after writing its placements (a data centre's Serve applications
deploying), and every replica used to read `SiteGone` meanwhile: the previous snapshot
had none of the new sites."""

from __future__ import annotations

import asyncio
import pathlib
import threading

import httpx

from orchestrator.reconciler import actions as act
from orchestrator.testing import harness

from . import support
from .conftest import start_control_plane


def test_placements_written_by_a_pass_in_progress_show_their_sites(tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    cp = start_control_plane(tmp_path / "cp", offline_fleet, insecure_agents=True, bootstrap_tokens=(harness.BOOTSTRAP_TOKEN,))
    written, go_on = threading.Event(), threading.Event()
    agent = None
    try:
        assert cp.cp is not None
        # the data centres of the offline fleet do not answer: the replicas go to this agent's site
        agent = harness.spawn_agent(harness.agent_command(cp.cp.agent_target, "edge-lyon", tmp_path / "agent"),
                                    "edge-lyon", tmp_path / "agent")
        reconciler = cp.cp.reconciler
        execute = reconciler.execute

        async def slow_after_placements(action: act.Action) -> None:
            await execute(action)
            if isinstance(action, act.RecordPlacement) and action.rows and not written.is_set():
                written.set()  # the next actions of this pass (a data centre's apps, say) take a while
                await asyncio.to_thread(go_on.wait, 30)

        reconciler.execute = slow_after_placements  # type: ignore[method-assign]
        applied = support.cli("apply", "-f", str(offline_fleet), server_url=cp.url)
        assert applied.returncode == 0, applied.stderr
        assert written.wait(30), "no pass wrote placements"
        items = httpx.get(f"{cp.url}/v1/placements", timeout=10).json()["items"]
        assert items, "the rows of the pass in progress are stored"
        states = {(i["deployment"], i["site"]): i.get("state") for i in items}
        assert "SiteGone" not in states.values(), states
        assert all(state is not None for state in states.values()), states
    finally:
        go_on.set()
        if agent is not None:
            agent.stop()
        cp.stop()
