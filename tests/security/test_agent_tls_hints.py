"""An agent started with the wrong TLS settings says which flag to change.

Each case runs a real control plane (in-process) and a real ``edgeplane-agent`` with one
wrong setting, and waits for the hint in the agent's log: the agent retries for ever, so
the log is all an operator has. A --ca-file of another control plane is
test_mtls_join.test_an_agent_given_another_ca_says_what_to_check.
"""

from __future__ import annotations

import contextlib
import pathlib
import socket
from collections.abc import Iterator

import pytest

from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio


@contextlib.contextmanager
def _port_pair(hold_first: bool) -> Iterator[int]:
    """A loopback port P whose P + 1 is held (bound, not listening: nothing answers there,
    as at an agent's default join port); P is held too, or left free for a control plane."""
    for _ in range(50):  # bounded: another process may hold the port after the one given
        first, second = socket.socket(), socket.socket()
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        try:
            second.bind(("127.0.0.1", port + 1))
        except (OSError, OverflowError):
            first.close()
            second.close()
            continue
        try:
            if not hold_first:
                first.close()
            yield port
        finally:
            first.close()
            second.close()
        return
    raise AssertionError("no two free loopback ports in a row in 50 tries")


def _port(target: str) -> int:
    return int(target.rpartition(":")[2])


def _without_insecure(cmd: list[str]) -> list[str]:
    return [arg for arg in cmd if arg != "--insecure"]


async def _hint_logged(fleet: harness.Fleet, cmd: list[str], data_dir: pathlib.Path, hint: str) -> str:
    agent = await harness.spawn_agent_async(cmd, "edge-a", data_dir)
    fleet.agents["edge-a"] = agent
    await harness.wait_until(lambda: hint in agent.log(), 30, what=f"{hint!r} in the agent's log")
    return agent.log()


async def test_an_insecure_agent_at_a_tls_control_plane_is_told_to_drop_insecure(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        cmd = harness.agent_command(cp.agent_target, "edge-a", tmp_path / "agent")  # --insecure
        log = await _hint_logged(fleet, cmd, tmp_path / "agent",
                                 f"{cp.agent_target} speaks TLS, so the control plane takes agents over mutual TLS: drop "
                                 "--insecure and give --ca-file <control-plane data dir>/ca/ca.crt or --ca-sha256")
        assert "Socket closed" in log and "Traceback" not in log  # what gRPC said stays, on the same line
        assert cp.hub.status("edge-a") is None
    finally:
        await fleet.stop()


async def test_an_agent_without_a_ca_is_told_to_give_one(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        assert cp.agent_join_target
        cmd = _without_insecure(harness.agent_command(cp.agent_target, "edge-a", tmp_path / "agent",
                                                      extra=("--join-address", cp.agent_join_target)))
        log = await _hint_logged(fleet, cmd, tmp_path / "agent",
                                 "the control plane's certificate is not signed by a CA this machine trusts, and neither "
                                 "--ca-file nor --ca-sha256 was given: give --ca-file <control-plane data dir>/ca/ca.crt "
                                 "or --ca-sha256")
        assert "CERTIFICATE_VERIFY_FAILED" in log and "ssl_transport_security" not in log  # gRPC's own line is not repeated
        assert not (tmp_path / "agent" / "agent.crt").exists()
    finally:
        await fleet.stop()


@pytest.mark.parametrize("trust", [(), ("--ca-sha256", "ab" * 32)], ids=["no-ca", "ca-sha256"])
async def test_a_tls_agent_at_an_insecure_control_plane_is_told_to_use_insecure(tmp_path: pathlib.Path, trust: tuple[str, ...]) -> None:
    """No join port there: told apart from a control plane that is down by what answers on
    the agent port (plaintext gRPC). With --ca-sha256 the agent fails earlier, reading the
    join listener's certificate chain, and says the same."""
    fleet = harness.Fleet(tmp_path)
    try:
        with _port_pair(hold_first=False) as port:  # the default join port, --control-plane's + 1, answers nothing
            cp = await fleet.start_control_plane(insecure_agents=True, agent_port=port)
            assert cp.agent_join_target is None and _port(cp.agent_target) == port
            join_port = port + 1
            cmd = _without_insecure(harness.agent_command(cp.agent_target, "edge-a", tmp_path / "agent", extra=trust))
            await _hint_logged(fleet, cmd, tmp_path / "agent",
                               f"nothing answers on the join port 127.0.0.1:{join_port} (--control-plane's port + 1) and "
                               f"{cp.agent_target} speaks plaintext gRPC: a control plane started with --insecure-agents "
                               "takes agents with --insecure")
    finally:
        await fleet.stop()


async def test_a_join_port_elsewhere_is_told_to_give_join_address(tmp_path: pathlib.Path) -> None:
    """A control plane whose join port is not its agent port + 1 (`--agent-join-port` given): the agent is told to give --join-address."""
    fleet = harness.Fleet(tmp_path)
    try:
        with _port_pair(hold_first=False) as port:
            cp = await fleet.start_control_plane(agent_port=port)  # joins on a free port, not port + 1
            assert cp.ca_file is not None and cp.agent_join_target != f"127.0.0.1:{port + 1}"
            join_port = port + 1
            cmd = _without_insecure(harness.agent_command(cp.agent_target, "edge-a", tmp_path / "agent",
                                                          extra=("--ca-file", str(cp.ca_file))))
            await _hint_logged(fleet, cmd, tmp_path / "agent",
                               f"nothing answers on the join port 127.0.0.1:{join_port} (--control-plane's port + 1) but "
                               f"{cp.agent_target} speaks TLS: give --join-address HOST:PORT, the 'first joins on' address")
    finally:
        await fleet.stop()


@pytest.mark.parametrize("extra", [(), ("--insecure",)], ids=["tls", "insecure"])
async def test_a_control_plane_that_is_down_is_not_called_a_tls_mismatch(tmp_path: pathlib.Path, extra: tuple[str, ...]) -> None:
    fleet = harness.Fleet(tmp_path)  # no control plane
    try:
        with _port_pair(hold_first=True) as port:
            # at debug level: a failure said once is said again only every 10 minutes at warning level
            cmd = _without_insecure(harness.agent_command(f"127.0.0.1:{port}", "edge-a", tmp_path / "agent",
                                                          extra=(*extra, "--log-level", "debug")))
            agent = await harness.spawn_agent_async(cmd, "edge-a", tmp_path / "agent")
            fleet.agents["edge-a"] = agent
            await harness.wait_until(lambda: agent.log().count("Connection refused") >= 2, 30, what="two attempts")
            log = agent.log()
            assert "--insecure-agents" not in log and "speaks" not in log and "--ca-file" not in log, log
            if not extra:  # refused on the join port: the address the operator gave is named too
                assert f"nothing answers on 127.0.0.1:{port} either: is the control plane running there?" in log
    finally:
        await fleet.stop()
