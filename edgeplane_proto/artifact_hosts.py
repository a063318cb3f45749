"""Which hosts an artifact download may reach: ``edgeplane serve --artifact-host``.

One rule on both ends. The control plane applies it to a Model's URL before handing it
out; the agent and the data-centre replica apply it to every redirect they are answered
with, since the URL checked is only where a download starts. It imports nothing, so the
agent's short-lived download process pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_REDIRECTS = 5  # a download follows at most this many redirects


def allows_redirect(allowed: Sequence[str], start_host: str | None, host: str) -> bool:
    """Whether a download that started at ``start_host`` may follow a redirect to ``host``:
    its own host, or one :func:`allows`."""
    return host == start_host or allows(allowed, host)


def allows(allowed: Sequence[str], host: str) -> bool:
    """Whether ``host`` is one of ``allowed``: exact (any case, any port), or under a
    ``.domain`` entry; an empty ``allowed`` allows any host."""
    if not allowed:
        return True
    host = host.lower()
    return any(host == a or (a.startswith(".") and host.endswith(a)) for a in (a.lower() for a in allowed))
