"""Names in URLs: what a user or an application names is one path segment, never more."""

from __future__ import annotations

import urllib.parse


def path_segment(name: str) -> str:
    """``name`` as one path segment of a URL: ``../sites/edge-b`` or ``a?x=1`` must name that
    object, never another path or a query."""
    quoted = urllib.parse.quote(name, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted  # a dot segment is removed, not sent
