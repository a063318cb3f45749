"""Which URL a process may give others to reach it: an agent's endpoint
(``edgeplane-agent --advertise-url``), the control plane's ``--public-url``.

One rule on both ends. The control plane refuses a join whose URL breaks it (a gateway
forwards requests to that URL), and the agent checks its flag against it before starting:
an agent that offered such a URL would be refused at every join, and retry for ever.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

MAX_CHARS = 2048


def refusal(url: str) -> str | None:
    """Why ``url`` cannot be given to others to reach a process at (an agent's endpoint, the
    control plane's public URL), or None when it can. The callers name their flag."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "http://[::1": an IPv6 host not closed, which no one could reach
        return f"{url!r} is not a URL ({exc})"
    try:
        port_ok = parts.port != 0  # None: the scheme's
    except ValueError:  # out of range or not a number: a gateway could not forward to it
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        return f"{url!r} must be an http(s) URL with a host and, if any, a port from 1 to 65535"
    try:
        if ipaddress.ip_address(parts.hostname).is_unspecified:
            return f"{url!r} is an address to listen on, not one others can reach: give one they can"
    except ValueError:
        pass  # a host name
    if len(url) > MAX_CHARS:
        return f"the URL is {len(url)} characters; at most {MAX_CHARS}"
    return None
