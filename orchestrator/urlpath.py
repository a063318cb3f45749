"""Names in URLs: what a user or an application names is one path segment, never more;
and the base URLs every request is built on."""

from __future__ import annotations

import re
import urllib.parse

import httpx


def path_segment(name: str) -> str:
    """``name`` as one path segment of a URL: ``../sites/edge-b`` or ``a?x=1`` must name that
    object, never another path or a query."""
    quoted = urllib.parse.quote(name, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted  # a dot segment is removed, not sent


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a base URL to call (None when it can). A path is kept, as the
    prefix a reverse proxy serves the control plane under (``https://proxy.example/edgeplane``);
    a query or fragment would garble every URL built on it, and another scheme, a missing
    host (``localhost:8080``), a host that is no DNS name (``ex..ample``, a label over 63
    characters, a broken ``xn--`` label) or a port out of range reaches nothing. A user name or password
    (``https://ops:pass@proxy``) is refused: httpx would send it as ``Authorization: Basic``
    in place of the bearer token, and every message naming the URL would show it."""
    if _userinfo(url):
        return "no user name or password in a base URL: the API token is given apart, and travels as a bearer token"
    try:
        parsed = httpx.URL(url)
        port = parsed.port
        host = parsed.host
    except httpx.InvalidURL as exc:
        return str(exc)
    except UnicodeError:  # httpx decodes an xn-- label with idna, which refuses one that is no punycode
        return NOT_A_HOST_NAME
    if parsed.scheme not in ("http", "https") or not host:
        return "it needs http:// or https:// and a host"
    try:
        host.encode("idna")  # what the resolver is given: the request would raise it, not the URL
    except UnicodeError:
        return NOT_A_HOST_NAME
    if port is not None and not 0 < port <= 65535:
        return f"port {port} is not 1-65535"
    if parsed.query:
        return f"no query in a base URL: ?{parsed.query.decode(errors='replace')}"
    if parsed.fragment:
        return f"no fragment in a base URL: #{parsed.fragment}"
    return None


NOT_A_HOST_NAME = "the host is no DNS name: each dot-separated label 1 to 63 characters, an xn-- label valid punycode"

_AUTHORITY = re.compile(r"^(?P<head>[^:/?#]*://|//)?(?P<userinfo>[^/?#]*@)")


def _userinfo(url: str) -> bool:
    return _AUTHORITY.match(url) is not None


def redacted(url: str) -> str:
    """``url`` fit to show in a message: a user name or password in it becomes ``***``."""
    return _AUTHORITY.sub(lambda m: f"{m['head'] or ''}***@", url, count=1)
