"""The version an agent reports to the control plane tells its build from another of the
same release: the package's build (``setup.py``) bakes its identifier in, which the agent
then reports at its join and prints for ``--version``."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

from orchestrator.agents import model
from orchestrator.testing import harness
from tests import built_package

from .conftest import TOKEN, ControlPlane


async def test_a_built_agent_reports_its_build_to_the_control_plane(control_plane: ControlPlane, tmp_path: pathlib.Path) -> None:
    release = tomllib.loads((harness.REPO / "pyproject.toml").read_text())["project"]["version"]
    env = built_package.installed(tmp_path, "ci 1234/g5e1f2a3")
    expected = f"{release}+ci.1234.g5e1f2a3"  # a PEP 440 local label
    printed = subprocess.run([sys.executable, "-m", "edge_agent.main", "--version"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert printed.strip() == f"edgeplane-agent {expected}"
    proc = subprocess.Popen(harness.agent_command(control_plane.target, "edge-built", tmp_path / "data", token=TOKEN),
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        joined = await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e.site == "edge-built")
        assert joined.status.agent_version == expected
    finally:
        proc.kill()
        proc.wait(10)
