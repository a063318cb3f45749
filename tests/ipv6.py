"""Whether this machine has an IPv6 loopback (``::1``): the tests of IPv6 addresses skip,
saying so, where it has none (a container started with IPv6 off)."""

from __future__ import annotations

import socket

import pytest


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


#: Marks a test that needs ``::1``.
needs_ipv6_loopback = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
