"""`pip install edgeplane` without an extra brings no onnxruntime: the CPU and CUDA builds
install into the same folder, so the package leaves the choice to its ``cpu`` and ``gpu``
extras. The commands that run models then say which to install, in one line, instead of
ending in a traceback (ModuleNotFoundError: No module named 'onnxruntime')."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def env_without_onnxruntime(tmp_path: pathlib.Path) -> dict[str, str]:
    """A Python whose ``import onnxruntime`` fails as it does where the package is not installed."""
    stub = tmp_path / "shadow" / "onnxruntime"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    return {**os.environ, "PYTHONPATH": str(stub.parent), "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _says_which_extra(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "onnxruntime" in proc.stderr and "edgeplane[cpu]" in proc.stderr and "edgeplane[gpu]" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [["serve", "--port", "0", "--agent-port", "0"], ["demo", "--no-ray", "--no-real-model"]],
                         ids=["serve", "demo"])
def test_the_control_plane_says_which_extra_to_install(env_without_onnxruntime: dict[str, str], tmp_path: pathlib.Path,
                                                       command: list[str]) -> None:
    env = {**env_without_onnxruntime, "EDGEPLANE_DATA_DIR": str(tmp_path / "cp")}
    proc = _run(["orchestrator.cli.main", *command], env)
    _says_which_extra(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_agent_says_which_extra_to_install(env_without_onnxruntime: dict[str, str], tmp_path: pathlib.Path) -> None:
    proc = _run(["edge_agent.main", "--control-plane", "127.0.0.1:9", "--site", "edge-x", "--token", "t", "--insecure",
                 "--data-dir", str(tmp_path / "agent")], env_without_onnxruntime)
    _says_which_extra(proc)


def test_commands_that_run_no_model_need_no_onnxruntime(env_without_onnxruntime: dict[str, str], tmp_path: pathlib.Path) -> None:
    manifest = tmp_path / "sites.yaml"
    manifest.write_text((REPO / "manifests" / "examples" / "sites.yaml").read_text())
    proc = _run(["orchestrator.cli.main", "simulate", "-f", str(tmp_path), "--fail-site", "edge-lyon"], env_without_onnxruntime)
    assert "onnxruntime" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
