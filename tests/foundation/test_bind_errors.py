"""Ports: the agent's default does not collide with the control plane's, and an address that
cannot be bound is named in the error (one line, exit code 1, no traceback)."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
from collections.abc import Iterator

import pytest

import edge_agent
from orchestrator import server_config
from tests.ipv6 import needs_ipv6_loopback

from . import support
from .conftest import start_control_plane

AGENT = support.EDGEPLANE.parent / "edgeplane-agent"


def test_the_agents_default_port_is_not_one_of_the_control_planes() -> None:
    cfg = server_config.ServerConfig()
    assert edge_agent.DEFAULT_LISTEN_PORT not in {cfg.port, cfg.agent_port, cfg.agent_join_port}
    proc = subprocess.run([str(AGENT), "--help"], capture_output=True, text=True, timeout=60)
    assert f"[127.0.0.1:{edge_agent.DEFAULT_LISTEN_PORT}]" in " ".join(proc.stdout.split())


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_the_agent_names_the_address_it_cannot_bind(busy_port: int, tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([str(AGENT), "--control-plane", f"127.0.0.1:{support.closed_port()}", "--site", "edge-x", "--token", "t",
                           "--insecure", "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{busy_port}"],
                          capture_output=True, text=True, timeout=60, env=support.clean_env())
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{busy_port} (v2 HTTP API, --listen)" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("flag", "what"), [
    ("--port", "HTTP API and gateway"), ("--agent-port", "agents"), ("--agent-join-port", "agent joins")])
def test_the_control_plane_names_the_address_it_cannot_bind(flag: str, what: str, busy_port: int, tmp_path: pathlib.Path) -> None:
    ports = {"--port": support.free_port(), "--agent-port": support.free_port(), "--agent-join-port": support.free_port(), flag: busy_port}
    args = [a for kv in ports.items() for a in (kv[0], str(kv[1]))]
    proc = subprocess.run([str(support.EDGEPLANE), "serve", "--data-dir", str(tmp_path / "data"), *args, "--log-level", "warning"],
                          capture_output=True, text=True, timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot listen on 127.0.0.1:{busy_port} ({what}" in proc.stderr, proc.stderr


def test_an_agent_port_another_grpc_server_holds_is_not_shared(tmp_path: pathlib.Path) -> None:
    """gRPC binds with SO_REUSEPORT unless told not to: a second control plane on a taken
    --agent-port started, and the kernel split the agents between the two. The port here is
    held as gRPC holds it, SO_REUSEPORT set; the same port for --port and --agent-port too."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        for ports, what in (((support.free_port(), taken), "agents"), ((taken, taken), "agents")):
            if ports[0] == taken:  # --port and --agent-port the same: the HTTP socket is bound first, without SO_REUSEPORT
                holder.close()
            proc = subprocess.run([str(support.EDGEPLANE), "serve", "--data-dir", str(tmp_path / "data"), "--port", str(ports[0]),
                                   "--agent-port", str(ports[1]), "--agent-join-port", "0", "--log-level", "warning"],
                                  capture_output=True, text=True, timeout=60, env=support.clean_env(), cwd=tmp_path)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc
            assert f"cannot listen on 127.0.0.1:{taken} ({what}" in proc.stderr, proc.stderr
    finally:
        holder.close()


@pytest.mark.parametrize(("flags", "join"), [
    ([], 8082), (["--agent-port", "9000"], 9001), (["--agent-port", "9000", "--agent-join-port", "7000"], 7000),
    (["--agent-port", "0"], 0)])
def test_the_join_port_is_where_agents_look_for_it(flags: list[str], join: int) -> None:
    """An agent without --join-address dials its --control-plane port + 1 for its first join:
    a fixed 8082 beside --agent-port 9000 failed every first join."""
    from orchestrator.cli import main as cli_main

    config = server_config.config_from_args(cli_main.build_parser().parse_args(["serve", *flags]))
    assert config.agent_join_port == join


@pytest.mark.parametrize(("flags", "message"), [
    (["--agent-port", "65535"], "--agent-port 65535 leaves no port + 1 for first joins: give --agent-join-port"),
    (["--location", "100,0"], "--location '100,0' is outside -90..90, -180..180"),
    (["--location", "abc"], "--location 'abc' is not lat,lon"),
    (["--public-url", "ftp://cp.example"], "argument --public-url: 'ftp://cp.example' must be an http(s) URL with a host"),
    (["--public-url", "cp.example:8080"], "argument --public-url: 'cp.example:8080' must be an http(s) URL with a host"),
    (["--public-url", "http://[::1"], "argument --public-url: 'http://[::1' is not a URL (Invalid IPv6 URL)"),
    (["--public-url", "http://[::]:8080"], "argument --public-url: 'http://[::]:8080' is an address to listen on, not one others can reach"),
    (["--peer-address", "nohostport"], "argument --peer-address: 'nohostport' is not HOST:PORT"),
    (["--peer-address", "::1:8081"], "argument --peer-address: '::1:8081' is not HOST:PORT"),
    (["--peer-address", "0.0.0.0:8081"], "argument --peer-address: '0.0.0.0:8081' is an address to listen on, not one to dial"),
])
def test_a_serve_option_that_cannot_work_is_a_usage_error(flags: list[str], message: str, tmp_path: pathlib.Path) -> None:
    """Exit code 2, as every usage error (1 is a port in use): one line naming the option,
    before anything is created."""
    proc = subprocess.run([str(support.EDGEPLANE), "serve", *flags], capture_output=True, text=True, timeout=60,
                          env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flag", "value"), [
    ("--public-url", "https://cp.example.com"), ("--public-url", "http://[2001:db8::5]:8080/edgeplane"),
    ("--peer-address", "cp-0.cp.edgeplane.svc:8081"), ("--peer-address", "[2001:db8::5]:8081"),
])
def test_good_public_urls_and_peer_addresses_are_taken_as_written(flag: str, value: str) -> None:
    from orchestrator.cli import main as cli_main

    config = server_config.config_from_args(cli_main.build_parser().parse_args(["serve", flag, value]))
    assert (config.public_url if flag == "--public-url" else config.peer_address) == value


@pytest.mark.parametrize("command", [
    ["serve", "--port", "99999"], ["serve", "--agent-port", "-1"], ["serve", "--agent-join-port", "http"],
    ["gateway", "--control-plane", "http://127.0.0.1:8080", "--port", "70000"],
    ["agent", "--control-plane", "127.0.0.1:8081", "--site", "edge-x", "--token", "t", "--listen", "127.0.0.1:99999"],
])
def test_a_port_out_of_range_is_a_usage_error(command: list[str], tmp_path: pathlib.Path) -> None:
    program = [str(AGENT), *command[1:]] if command[0] == "agent" else [str(support.EDGEPLANE), *command]
    proc = subprocess.run(program, capture_output=True, text=True, timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].endswith(
        ("is not a port (0-65535)", "is not a port number")), proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


@pytest.mark.parametrize("command", [["serve"], ["gateway", "--control-plane", "http://127.0.0.1:8080"]])
def test_an_unknown_log_level_is_a_usage_error(command: list[str], tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([str(support.EDGEPLANE), *command, "--log-level", "loud"], capture_output=True, text=True,
                          timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert proc.stderr.strip().endswith("argument --log-level: invalid choice: 'loud' (choose from 'debug', 'info', 'warning', 'error')")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("store", "message"), [
    ("mysql://root@db/edgeplane", "unsupported store URL scheme 'mysql'"), ("sqlite://", "sqlite:// needs a path")])
def test_a_store_url_it_cannot_open_is_refused_not_taken_for_a_file(store: str, message: str, tmp_path: pathlib.Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --store`` refuses these before it starts (test_bad_input_cli_more.py); a
    configuration built in code meets the store's own check."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(server_config.ConfigError, match=re.escape(message)):
        start_control_plane(tmp_path / "data", support.EXAMPLES, store=store)
    assert not (tmp_path / "mysql:").exists() and not list((tmp_path / "data").glob("*.db"))


def test_a_state_file_that_is_not_a_database_is_refused_and_left_as_it_was(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "state.db").write_bytes(b"not sqlite: a truncated copy, or another program's file\n" * 20)
    before = (data / "state.db").read_bytes()
    proc = subprocess.run([str(support.EDGEPLANE), "serve", "--data-dir", str(data), "--port", str(support.free_port()),
                           "--agent-port", "0", "--agent-join-port", "0"],
                          capture_output=True, text=True, timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot open the SQLite store {data / 'state.db'}: file is not a database "
        "(not an edgeplane state file: restore it from a backup, or give another --data-dir/--store)"), proc.stderr
    assert (data / "state.db").read_bytes() == before


def test_a_damaged_agent_ca_is_refused_in_one_line(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    (data / "ca").mkdir(parents=True)
    (data / "ca" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\ncut short\n")
    proc = subprocess.run([str(support.EDGEPLANE), "serve", "--data-dir", str(data), "--port", str(support.free_port()),
                           "--agent-port", "0", "--agent-join-port", "0"],
                          capture_output=True, text=True, timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: the agents' CA: {data / 'ca'} holds ca.crt but not ca.key"), proc.stderr
    assert sorted(p.name for p in (data / "ca").iterdir()) == ["ca.crt"]


def test_a_second_control_plane_on_the_same_state_file_is_refused(tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    """On SQLite a control plane leads without a lease: a second one on the same file would
    reconcile and push assignments unfenced beside it. It is refused, naming the first;
    once the first stops, the file is free again (a lock the kernel drops, kill -9 too)."""
    from .conftest import start_control_plane

    first = start_control_plane(tmp_path / "data", offline_fleet)
    try:
        with pytest.raises(server_config.ConfigError, match=rf"another control plane \(pid {os.getpid()}\) is using {tmp_path / 'data' / 'state.db'}: stop it first"):
            start_control_plane(tmp_path / "data", offline_fleet)
    finally:
        first.stop()
    again = start_control_plane(tmp_path / "data", offline_fleet)
    again.stop()


@needs_ipv6_loopback
@pytest.mark.parametrize("command", [
    ["serve", "--agent-host", "[::1]", "--agent-port", "0", "--agent-join-port", "0"],
    ["gateway", "--control-plane", "http://[::1]:9"],
])
def test_an_ipv6_host_to_serve_on_is_taken_in_brackets_too(command: list[str], tmp_path: pathlib.Path) -> None:
    """``--host [::1]``, as an agent's ``--listen [::1]:9001`` and every URL write it, failed
    to start: 'cannot listen on [[::1]]:8080 ...: Name or service not known'."""
    port = support.free_port()
    proc = subprocess.Popen([str(support.EDGEPLANE), *command, "--host", "[::1]", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=support.clean_env(), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()  # printed once it listens; empty if it exits first
        assert f"http://[::1]:{port}" in banner, banner or proc.communicate(timeout=60)[1]
        with socket.create_connection(("::1", port), timeout=10):
            pass
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@needs_ipv6_loopback
def test_the_agent_names_an_ipv6_grpc_address_it_cannot_bind_in_brackets(tmp_path: pathlib.Path) -> None:
    """'cannot serve gRPC inference on ::1:9002', an address no flag takes as written."""
    with socket.socket(socket.AF_INET6) as held:
        held.bind(("::1", 0))
        held.listen()
        busy = held.getsockname()[1]
        proc = subprocess.run([str(AGENT), "--control-plane", f"127.0.0.1:{support.closed_port()}", "--site", "edge-x", "--token", "t",
                               "--insecure", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--grpc-listen", f"[::1]:{busy}"],
                              capture_output=True, text=True, timeout=60, env=support.clean_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc
    assert f"cannot serve gRPC inference on [::1]:{busy}" in proc.stderr, proc.stderr
