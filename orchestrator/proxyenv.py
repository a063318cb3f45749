"""The proxy settings of the environment: which requests go through a proxy, and what to
say when one cannot be used.

edgeplane applies ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` itself
rather than leave them to httpx, which reads a ``NO_PROXY`` block such as ``10.0.0.0/8``
(how replicas' private networks are usually exempted, and what curl, Go and requests
honour) as the one host ``10.0.0.0``, so every call into the block went to the proxy.
:func:`settings_of` reads them (as :func:`urllib.request.getproxies` finds them, as httpx
did) and :func:`proxy_for` decides, purely, where one URL goes; :func:`transport` and
:func:`async_transport` give a client's transport, which sends each request as decided.
Every HTTP client of edgeplane is made with them and ``trust_env=False`` (:func:`client` and
:func:`async_client` make one so): the CLI's, the Python client's, the standalone gateway's
(following the control plane), a data-centre replica's artifact downloads and the Ray Serve
adapter's.

A proxy transport is made with the client, before any request (so ``NO_PROXY`` does not
help): one httpx cannot use raises there, an ``ImportError`` for a SOCKS proxy
(``ALL_PROXY=socks5://...``, an ``ssh -D`` tunnel) without the socksio package, which
edgeplane does not install, a ``ValueError`` for a scheme other than http(s) and socks5,
and ``httpx.InvalidURL`` (not a ``ValueError``) for a URL it cannot parse
(``http://host:abc``, ``http://[::1``). Both catch :data:`UNUSABLE` and say the same
thing about it (:func:`explain`).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from orchestrator import urlpath

VARIABLES = ("ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
#: What making an httpx client raises for proxy settings it cannot use.
UNUSABLE: tuple[type[Exception], ...] = (ImportError, ValueError, httpx.InvalidURL)

#: A transport's pool unless told otherwise: httpx's own (100 connections, 20 kept idle).
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class _Exempt:
    """One entry of ``NO_PROXY``: an address block (an address is a block of one), or a
    domain with its subdomains; with a port, that port only. A leading dot (``.example.com``)
    is ignored, as curl and Python's urllib ignore it: it exempts example.com too (Go's rule,
    the subdomains only, would send example.com itself to the proxy a curl beside it skips)."""

    network: _Network | None = None
    domain: str = ""
    port: int | None = None

    def covers(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:  # a name: no block holds it (names are not resolved to decide)
                return False
        return host == self.domain or host.endswith("." + self.domain)


@dataclass(frozen=True)
class Settings:
    """Where the environment says requests go: a proxy URL by scheme (``http``, ``https``,
    ``all``), and the hosts exempt from them (``everywhere``: ``NO_PROXY=*``)."""

    proxies: Mapping[str, str]
    exempt: tuple[_Exempt, ...] = ()
    everywhere: bool = False


def settings_of(found: Mapping[str, str]) -> Settings:
    """The settings in ``found``, :func:`urllib.request.getproxies`' answer (``http``,
    ``https``, ``all``, ``no``); a proxy given without a scheme is an ``http://`` one."""
    proxies = {scheme: url if "://" in url else f"http://{url}" for scheme in ("http", "https", "all") if (url := found.get(scheme))}
    exempt = []
    for entry in (e.strip().lower() for e in found.get("no", "").split(",")):
        if entry == "*":
            return Settings({}, everywhere=True)
        if entry:
            exempt.append(_exempt(entry))
    return Settings(proxies, tuple(exempt))


def _exempt(entry: str) -> _Exempt:
    if "://" in entry:  # http://host: the host
        entry = entry.split("://", 1)[1].split("/", 1)[0]
    host, port = entry, None
    head, colon, tail = entry.rpartition(":")
    if colon and tail.isdigit() and (":" not in head or head.startswith("[") and head.endswith("]")):  # host:port, [::1]:port
        host, port = head, int(tail)
    try:  # an address or a block: 10.0.0.0/8, 127.0.0.1, ::1, [::1], fd00::/8
        return _Exempt(network=ipaddress.ip_network(host.strip("[]"), strict=False), port=port)
    except ValueError:
        return _Exempt(domain=host.removeprefix("*").lstrip("."), port=port)


def proxy_for(settings: Settings, url: httpx.URL) -> str | None:
    """The proxy ``url`` goes through, or None to call it directly."""
    if settings.everywhere or not settings.proxies:
        return None
    host = url.host.lower().rstrip(".")
    port = url.port or (443 if url.scheme == "https" else 80)
    if any(e.covers(host, port) for e in settings.exempt):
        return None
    return settings.proxies.get(url.scheme) or settings.proxies.get("all")


_T = TypeVar("_T")


class _Routes(Generic[_T]):
    """Which transport each request is sent through, decided once per scheme, host and port."""

    KEPT = 1024  # decisions kept (a client calls a few replicas and gateways)

    def __init__(self, settings: Settings, direct: _T, through: Callable[[str], _T]) -> None:
        self._settings = settings
        self.direct = direct
        self.proxied = {url: through(url) for url in set(settings.proxies.values())}  # made now: UNUSABLE raises here
        self._decided: dict[tuple[str, str, int | None], _T] = {}

    def of(self, url: httpx.URL) -> _T:
        key = (url.scheme, url.host, url.port)
        chosen = self._decided.get(key)
        if chosen is None:
            proxy = proxy_for(self._settings, url)
            chosen = self.direct if proxy is None else self.proxied[proxy]
            if len(self._decided) >= self.KEPT:
                self._decided.clear()
            self._decided[key] = chosen
        return chosen


class _Routing(httpx.BaseTransport):
    def __init__(self, routes: _Routes[httpx.BaseTransport]) -> None:
        self._routes = routes

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._routes.of(request.url).handle_request(request)

    def close(self) -> None:
        for transport in (self._routes.direct, *self._routes.proxied.values()):
            transport.close()


class _AsyncRouting(httpx.AsyncBaseTransport):
    def __init__(self, routes: _Routes[httpx.AsyncBaseTransport]) -> None:
        self._routes = routes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._routes.of(request.url).handle_async_request(request)

    async def aclose(self) -> None:
        for transport in (self._routes.direct, *self._routes.proxied.values()):
            await transport.aclose()


def transport(limits: httpx.Limits = LIMITS) -> httpx.BaseTransport:
    """A synchronous client's transport for the environment's settings, each of its pools
    (direct, and one for each proxy) held to ``limits`` (httpx's own by default); raises one
    of :data:`UNUSABLE` for a proxy httpx cannot use."""
    settings = settings_of(urllib.request.getproxies())
    direct = httpx.HTTPTransport(limits=limits)
    if settings.everywhere or not settings.proxies:
        return direct
    return _Routing(_Routes[httpx.BaseTransport](settings, direct, lambda url: httpx.HTTPTransport(proxy=url, limits=limits)))


def async_transport(tls: ssl.SSLContext | None = None,
                    limits: httpx.Limits = LIMITS) -> httpx.AsyncBaseTransport:
    """:func:`transport` for an asynchronous client; ``tls``, when given, is the TLS context of
    each of its connections (made once by a client that makes several transports: building
    one reads the CA certificates, tens of milliseconds), else each transport makes its own."""
    settings = settings_of(urllib.request.getproxies())
    verify: ssl.SSLContext | bool = True if tls is None else tls
    direct = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    if settings.everywhere or not settings.proxies:
        return direct
    return _AsyncRouting(_Routes[httpx.AsyncBaseTransport](settings, direct,
                                                           lambda url: httpx.AsyncHTTPTransport(verify=verify, proxy=url, limits=limits)))


def client(**options: Any) -> httpx.Client:
    """An ``httpx.Client`` (``options`` as httpx takes them) that sends as the environment's
    proxy settings say, read here; ``ValueError`` (:func:`explain`) for a proxy httpx cannot use."""
    try:
        return httpx.Client(transport=transport(), trust_env=False, **options)
    except UNUSABLE as exc:
        raise ValueError(explain(exc)) from None


def async_client(transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> httpx.AsyncClient:
    """:func:`client` for asynchronous calls; a ``transport`` given is used as it is."""
    try:
        return httpx.AsyncClient(transport=transport or async_transport(), trust_env=False, **options)
    except UNUSABLE as exc:
        raise ValueError(explain(exc)) from None


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
