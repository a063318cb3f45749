"""Ports for the servers tests start as processes: free, distinct, and outside the range the
kernel draws outgoing connections' local ports from, so none of those can take one
between its choice and the server's bind (or a restart on the same port)."""

from __future__ import annotations

import pathlib
import socket

from orchestrator import ports


def ephemeral_start() -> int:
    """Where the kernel's range for outgoing connections' local ports begins, as it says."""
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # the kernel's default


def test_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    start = ephemeral_start()
    chosen = ports.free_ports(8)
    assert len(set(chosen)) == 8
    if start - ports.LOWEST >= 1_000:
        assert all(ports.LOWEST <= p < start for p in chosen), (chosen, start)
    for p in chosen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # nothing holds it


def test_a_port_in_use_is_never_chosen(monkeypatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.free_port()))
        taken.listen()
        used = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: ports.LOWEST + 1_000)
        first = [used, used]  # the taken port comes up twice, then the real choice
        choose = ports.random.choice
        monkeypatch.setattr(ports.random, "choice", lambda seq: first.pop() if first else choose(seq))
        (port,) = ports.free_ports(1)
        assert port != used and not first
