"""What the ``edgeplane`` and ``edgeplane-agent`` commands load and say before they do any
work: client commands and help start without the control plane, the scheduler or Ray
(seconds a user would wait on each), and both commands say the package's version."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

from . import support


def test_client_commands_start_without_the_control_plane_or_the_planner() -> None:
    """Every command but serve, gateway and the simulation's own run builds its parser
    and runs without importing the control plane, the scheduler (scipy) or Ray, and one
    that reads no manifest without the manifest schema."""
    code = ("import sys; from orchestrator.cli import main; main.build_parser(serve_options=False)"
            ".parse_args(['simulate', '--fail-site', 'x']);"
            " print(sorted(m for m in ('orchestrator.server', 'orchestrator.scheduler', 'orchestrator.manifests.schema', 'scipy', 'ray',"
            " 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=support.REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], [], ["--server", "http://127.0.0.1:9"], ["serve", "--help"], ["gateway", "--help"],
                                  ["serve", "--port", "99999"], ["gateway", "--control-plane", "http://x", "--port", "-1"]])
def test_the_first_help_a_user_asks_for_does_not_load_the_control_plane(argv: list[str]) -> None:
    """Help and usage errors answer before the servers are imported (about 2 s): serve's and
    gateway's options are defined apart from them (orchestrator.server_options)."""
    code = ("import sys; from orchestrator.cli import main\n"
            f"try:\n    main.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('orchestrator.server', 'orchestrator.gatewayd.server', 'ray') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=support.REPO)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
    said = done.stdout + done.stderr
    assert "usage: edgeplane" in said or ": error: argument --port: " in said, said  # help, or the one-line usage error


@pytest.mark.parametrize("command", [["edgeplane"], ["edgeplane-agent"]])
def test_both_commands_say_their_version(command: list[str]) -> None:
    import edge_agent
    import orchestrator

    bin_dir = pathlib.Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / command[0]), "--version"], capture_output=True, text=True, timeout=60)
    version = orchestrator.__version__ if command == ["edgeplane"] else edge_agent.__version__
    assert version == importlib.metadata.version("edgeplane")  # the package's own version, not a copy that drifted
    assert done.returncode == 0 and done.stdout.strip() == f"{command[0]} {version}", done.stderr
