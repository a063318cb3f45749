"""The proxy settings of the environment, named when httpx cannot use them.

httpx reads ``ALL_PROXY``, ``HTTPS_PROXY`` and ``HTTP_PROXY`` and mounts a transport for
each when a client is made, before any request (so ``NO_PROXY`` does not help): one it
cannot use raises there, an ``ImportError`` for a SOCKS proxy (``ALL_PROXY=socks5://...``,
an ``ssh -D`` tunnel) without the socksio package, which edgeplane does not install, a
``ValueError`` for a scheme other than http(s) and socks5, and ``httpx.InvalidURL`` (not a
``ValueError``) for a URL it cannot parse (``http://host:abc``, ``http://[::1``). The CLI
and the Python client both make their HTTP client from the user's environment, catch
:data:`UNUSABLE`, and say the same thing about it.
"""

from __future__ import annotations

import os

import httpx

from orchestrator import urlpath

VARIABLES = ("ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
#: What making an httpx client raises for proxy settings it cannot use.
UNUSABLE: tuple[type[Exception], ...] = (ImportError, ValueError, httpx.InvalidURL)


def explain(exc: Exception) -> str:
    """Why the proxy settings of the environment cannot be used (``exc``: what making an
    httpx client raised), naming them with any password shown as ``***``."""
    settings = [f"{name}={urlpath.redacted(os.environ[name])!r}" for name in VARIABLES if os.environ.get(name)]
    where = ", ".join(settings) or "the proxy settings of the environment"
    if isinstance(exc, ImportError):
        return f"{where}: a SOCKS proxy needs the socksio package (pip install socksio), or unset it for edgeplane"
    if isinstance(exc, httpx.InvalidURL):
        return f"{where}: not a URL ({exc})"
    return f"{where}: {exc}"
