"""Which of a model's endpoints the Python client tries, and in which order.

The list a gateway or the control plane gave (``GET /v1/endpoints/{model}``) is kept for
its TTL, less the entries a client cannot call, and a replica that failed a moment ago
is left out for ``ejection_s``. Lists are kept by a key the client gives, the model and the
caller it was asked for (``model?residency=FR``): a cache may be shared by clients of
several callers, and each list is its caller's. No I/O and an injected clock: :mod:`orchestrator.client`'s
synchronous and asynchronous clients ask for the list each over its own HTTP client and
share these decisions; a test puts a list in it and moves the clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator import urlpath


@dataclass
class _Endpoints:
    items: list[dict[str, Any]]
    fresh_until: float  # no need to ask again before (the list's TTL, or a backoff)


@dataclass
class EndpointCache:
    """The sans-I/O part shared by both clients: which URLs to try, in which order."""

    clock: Callable[[], float] = time.monotonic
    ejection_s: float = 10.0
    _lists: dict[str, _Endpoints] = field(default_factory=dict)
    _ejected: dict[str, float] = field(default_factory=dict)

    def fresh(self, model: str) -> bool:
        entry = self._lists.get(model)
        return entry is not None and self.clock() < entry.fresh_until

    def store(self, model: str, body: Any) -> None:
        """Keep the list of an endpoint answer; entries a client cannot call (no URL, a URL
        that does not parse) are left out, and a list that is not one counts as empty."""
        body = body if isinstance(body, Mapping) else {}
        items = body.get("endpoints")
        ttl = body.get("ttlSeconds", 10)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl < math.inf:
            ttl = 10
        usable = [e for e in items if callable_endpoint(e)] if isinstance(items, list) else []
        self._lists[model] = _Endpoints(usable, self.clock() + ttl)

    def keep(self, model: str) -> None:
        """No new list came (no gateway answered with one): serve the one held for
        ``ejection_s`` more before asking again, as long as an unreachable gateway is
        tried last; asking on every request would cost each one a connection attempt
        (the connect timeout, for a gateway that drops them) though its replica answers."""
        entry = self._lists.get(model)
        if entry is not None:
            entry.fresh_until = self.clock() + self.ejection_s

    def invalidate(self, model: str) -> None:
        self._lists.pop(model, None)

    def order(self, model: str) -> list[dict[str, Any]]:
        now = self.clock()
        entry = self._lists.get(model)
        if entry is None:
            return []
        return [e for e in entry.items if self._ejected.get(e["url"], 0) <= now]

    def eject(self, url: str) -> None:
        now = self.clock()
        # Those whose time is up go as another comes: a client that runs for months sees
        # replicas, and their URLs, come and go.
        self._ejected = {u: until for u, until in self._ejected.items() if until > now}
        self._ejected[url] = now + self.ejection_s

    def ejected(self) -> frozenset[str]:
        """The URLs (replicas, gateways) left out now."""
        now = self.clock()
        return frozenset(u for u, until in self._ejected.items() if until > now)


def callable_endpoint(e: Any) -> bool:
    """Whether an entry of an endpoint list has what a call needs: a site, a base URL and,
    for a v2 replica, its inference URL, each an http(s) URL."""
    if not isinstance(e, Mapping) or not isinstance(e.get("site"), str):
        return False
    urls = [e.get("url")] + ([] if e.get("api") == "openai" else [e.get("inferUrl")])
    return all(isinstance(u, str) and urlpath.base_url_problem(u) is None for u in urls)
