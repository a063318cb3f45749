"""A host and port written as one address, the way gRPC targets, URLs and edgeplane's own
flags (``--control-plane``, ``--join-address``) take it: an IPv6 address in brackets.

One rule for the control plane, the standalone gateway and the agent alike, since each
writes addresses it listens on and gives out; written by hand in each place, one that left
the brackets out said ``::1:8081``, which no agent takes.
"""

from __future__ import annotations


def address(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 address (``::1`` -> ``[::1]:8081``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
