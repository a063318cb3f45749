"""Loopback ports for servers started as processes: the embedded Ray head, and the control
planes, agents and databases that tests and benchmarks start.

A port found by binding port 0 comes from the kernel's ephemeral range, the same range
the kernel draws the local port of every outgoing connection from. Between the moment the
port is released and the moment the server binds it (a process start, or a restart after
``kill -9`` on the same port), any connection on the machine may take it, and the server
then fails to listen. Ports chosen below that range are never handed out that way: only
another program asking for that very port could take them.
"""

from __future__ import annotations

import random
import socket

#: Ray's worker processes take ports from 10002 to 19999 by default: stay above them.
LOWEST = 20_000
_DEFAULT_EPHEMERAL_START = 32_768


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_START


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nothing listens on now, below the ephemeral range when it
    leaves room (each held while the others are chosen); from the kernel otherwise."""
    top = _ephemeral_start()
    candidates = range(LOWEST, top) if top - LOWEST >= 1_000 else range(0)
    held: list[socket.socket] = []
    try:
        for _ in range(64 * count):  # bounded: a port in use is skipped
            if len(held) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, random.choice(candidates) if candidates else 0))
            except OSError:
                s.close()
                continue
            held.append(s)
        while len(held) < count:  # a crowded range: let the kernel choose
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port nothing listens on now (see :func:`free_ports`)."""
    return free_ports(1, host)[0]
