"""Which browser requests the control plane's HTTP server answers: none another web site made.

Why: with ``--auth none`` (the loopback default) nothing but the address stands between a
caller and the admin API, and the operator's browser is on that address. Any page it opens
can send ``POST http://127.0.0.1:8080/v1/sites/NAME/drain?force=true``: a CORS "simple
request" (no custom header, a text/plain body at most) goes out without a preflight, only
its answer is hidden from the page, so the site drains. A page whose own name its DNS later
resolves to 127.0.0.1 (DNS rebinding) is even same-origin with the server, and reads every
answer, captured requests included. Two checks close both, as Jupyter and Docker Desktop do,
without token auth:

- a request that may change something (any method but GET, HEAD and OPTIONS) is refused when
  it carries an ``Origin`` that is not the server's own: browsers send ``Origin`` with every
  such request, the console's own are same-origin, and the CLI, the Python client and agents
  send none;
- a request is answered only when its ``Host`` is a loopback name or address, the
  ``--public-url``'s host or a name given with ``--allowed-host``: a rebinding page's
  requests name the attacker's host.

With ``--auth token`` a caller is known by its bearer token, which a page of another site
cannot make the browser send (an ``Authorization`` header needs a preflight this server never
approves), so neither check adds anything: the server answers any ``Host`` (a reverse
proxy's, a load balancer's) and any ``Origin`` (the console behind a proxy that rewrites
``Host``, whose requests then name another origin than the ``Host`` they arrive with).
The decision (:func:`refusal`) is pure; :class:`OriginGuard` applies it in front of every
route, the gateway's and the artifacts' included.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api import auth, problems

#: Methods that only read: their answers are what the Host check protects.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Guard:
    """What the server counts as itself. ``open_api``: no token auth, so only requests that
    name it by a loopback name or an allowed one are answered, and only writes from its own
    origins; ``names``: host names allowed besides the loopback ones (lower case, no port),
    the ``--public-url``'s included."""

    open_api: bool
    names: frozenset[str] = frozenset()


def guard_for(open_api: bool, allowed_hosts: tuple[str, ...], public_url: str | None) -> Guard:
    """The guard of a server configured with ``--auth``, ``--allowed-host`` and ``--public-url``."""
    names = {h.lower().rstrip(".") for h in allowed_hosts}
    if public_url and (public := urllib.parse.urlsplit(public_url).hostname):
        names.add(public.lower().rstrip("."))
    return Guard(open_api, frozenset(names))


def refusal(guard: Guard, method: str, host: str | None, origin: str | None) -> str | None:
    """Why a request with these ``Host`` and ``Origin`` headers is refused, or None to answer it."""
    if not guard.open_api:  # every write needs a bearer token, which no page of another site can send
        return None
    if host is not None and not _answers_to(guard, host):
        return (f"this control plane runs without token auth and answers only to loopback names and those given with "
                f"--allowed-host or --public-url, not {host[:100]!r}")
    if method.upper() not in SAFE_METHODS and origin is not None and not _own_origin(guard, origin, host):
        return (f"a request from the web page of {origin[:100]!r} cannot change anything here; "
                f"if that is this server's own address, give its host with --allowed-host")
    return None


def _hostname(netloc: str) -> str | None:
    if "@" in netloc:  # no browser names a host so; urlsplit would read the name after it
        return None
    try:
        parts = urllib.parse.urlsplit(f"//{netloc}")
        name, _ = parts.hostname, parts.port  # a port that is no number: no host of ours
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def _answers_to(guard: Guard, host: str) -> bool:
    name = _hostname(host)
    return name is not None and (auth.is_loopback(name) or name in guard.names)


def _own_origin(guard: Guard, origin: str, host: str | None) -> bool:
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:  # "null": a sandboxed frame, a file:// page
        return False
    netloc = parts.netloc.lower()
    if host is not None and netloc == host.lower():
        return True
    return _hostname(netloc) in guard.names


class OriginGuard:
    """An ASGI app that answers 403 to what :func:`refusal` refuses and passes the rest on."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k: v for k, v in scope["headers"] if k in (b"host", b"origin")}
            why = refusal(self.guard, scope["method"],
                          *(headers[k].decode("latin-1") if k in headers else None for k in (b"host", b"origin")))
            if why is not None:
                body = problems.encoded(403, why)
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
