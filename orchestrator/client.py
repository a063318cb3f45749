"""Python client for applications: call the nearest replica directly, fail over, refresh.

``Client(server).infer(model, {"input": array})`` asks the control plane once for the
model's endpoints nearest to the caller (``GET /v1/endpoints/{model}``), caches the list
for its TTL, and then sends each request straight to the best replica — no gateway hop.
A connection error or 5xx moves on to the next endpoint at once and keeps the failed one
out of rotation for a while; when every direct endpoint fails, the request goes through
the gateway, so a replica dying mid-stream costs latency, not requests.

:class:`AsyncClient` is the same over ``httpx.AsyncClient``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from edgeplane_proto import oip


class EdgeplaneError(Exception):
    """Base of the client's errors."""


class NoEndpoint(EdgeplaneError):
    """The control plane knows no allowed, healthy replica for the model."""


class InferenceError(EdgeplaneError):
    """A replica refused the request (4xx): retrying elsewhere would not help."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class InferResult:
    outputs: Mapping[str, np.ndarray]
    site: str
    url: str
    attempts: int

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass
class _Endpoints:
    items: list[dict[str, Any]]
    fetched_at: float
    ttl: float


@dataclass
class EndpointCache:
    """The sans-I/O part shared by both clients: which URLs to try, in which order."""

    clock: Callable[[], float] = time.monotonic
    ejection_s: float = 10.0
    _lists: dict[str, _Endpoints] = field(default_factory=dict)
    _ejected: dict[str, float] = field(default_factory=dict)

    def fresh(self, model: str) -> bool:
        entry = self._lists.get(model)
        return entry is not None and self.clock() - entry.fetched_at < entry.ttl

    def store(self, model: str, body: Mapping[str, Any]) -> None:
        self._lists[model] = _Endpoints(list(body.get("endpoints") or []), self.clock(), float(body.get("ttlSeconds", 10)))

    def invalidate(self, model: str) -> None:
        self._lists.pop(model, None)

    def order(self, model: str) -> list[dict[str, Any]]:
        now = self.clock()
        entry = self._lists.get(model)
        if entry is None:
            return []
        return [e for e in entry.items if self._ejected.get(e["url"], 0) <= now]

    def eject(self, url: str) -> None:
        self._ejected[url] = self.clock() + self.ejection_s


def _caller_headers(location: tuple[float, float] | None, region: str | None, residency: str | None) -> dict[str, str]:
    headers = {}
    if location is not None:
        headers["x-edgeplane-location"] = f"{location[0]},{location[1]}"
    if region:
        headers["x-edgeplane-region"] = region
    if residency:
        headers["x-edgeplane-residency"] = residency
    return headers


def _endpoint_params(location: tuple[float, float] | None, residency: str | None) -> dict[str, str]:
    params = {}
    if location is not None:
        params.update(lat=str(location[0]), lon=str(location[1]))
    if residency:
        params["residency"] = residency
    return params


def _decode(resp: httpx.Response) -> Mapping[str, np.ndarray]:
    header = resp.headers.get(oip.BINARY_HEADER)
    decoded = oip.decode_response(resp.content, int(header) if header else None)
    return {t.name: t.array for t in decoded.outputs}


def _refusal(resp: httpx.Response) -> InferenceError:
    try:
        message = resp.json().get("error", resp.text)
    except ValueError:
        message = resp.text
    return InferenceError(resp.status_code, str(message)[:500])


class _Base:
    def __init__(self, server: str, *, token: str | None = None, location: tuple[float, float] | None = None,
                 region: str | None = None, residency: str | None = None, binary: bool = False,
                 cache: EndpointCache | None = None):
        self.server = server.rstrip("/")
        self.location, self.region, self.residency, self.binary = location, region, residency, binary
        self.cache = cache or EndpointCache()
        self._auth = {"authorization": f"Bearer {token}"} if token else {}

    def _body(self, inputs: Mapping[str, Any] | Sequence[oip.Tensor]) -> tuple[bytes, dict[str, str]]:
        tensors = inputs if not isinstance(inputs, Mapping) else {k: np.asarray(v) for k, v in inputs.items()}
        body, header_len = oip.encode_request(tensors, binary=self.binary)
        headers = {"content-type": "application/octet-stream" if header_len is not None else "application/json"}
        if header_len is not None:
            headers[oip.BINARY_HEADER] = str(header_len)
        return body, headers


class Client(_Base):
    """Synchronous client; use as a context manager or call :meth:`close`."""

    def __init__(self, server: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None, **kwargs: Any):
        super().__init__(server, **kwargs)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=2.0), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def endpoints(self, model: str, refresh: bool = False) -> list[dict[str, Any]]:
        if refresh or not self.cache.fresh(model):
            try:
                resp = self._http.get(f"{self.server}/v1/endpoints/{model}", params=_endpoint_params(self.location, self.residency), headers=self._auth)
                resp.raise_for_status()
                self.cache.store(model, resp.json())
            except httpx.HTTPError:
                if not self.cache.order(model):
                    self.cache.invalidate(model)
        return self.cache.order(model)

    def infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor]) -> InferResult:
        body, headers = self._body(inputs)
        attempts = 0
        for endpoint in self.endpoints(model):
            attempts += 1
            try:
                resp = self._http.post(endpoint["inferUrl"], content=body, headers=headers)
            except httpx.HTTPError:
                self.cache.eject(endpoint["url"])
                continue
            if resp.status_code >= 500:
                self.cache.eject(endpoint["url"])
                continue
            if resp.status_code >= 400:
                raise _refusal(resp)
            return InferResult(_decode(resp), endpoint["site"], endpoint["url"], attempts)
        # Every direct endpoint failed or none is known: the gateway decides and fails over.
        self.cache.invalidate(model)
        attempts += 1
        try:
            resp = self._http.post(f"{self.server}/v2/models/{model}/infer", content=body,
                                   headers={**headers, **self._auth, **_caller_headers(self.location, self.region, self.residency)})
        except httpx.HTTPError as exc:
            raise EdgeplaneError(f"neither a replica nor the gateway answered: {exc}") from exc
        if resp.status_code == 503 or resp.status_code == 404:
            raise NoEndpoint(_refusal(resp).args[0])
        if resp.status_code >= 400:
            raise _refusal(resp)
        return InferResult(_decode(resp), resp.headers.get("x-edgeplane-site", ""), self.server, attempts)


class AsyncClient(_Base):
    """Asynchronous client with the same behaviour as :class:`Client`."""

    def __init__(self, server: str, *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any):
        super().__init__(server, **kwargs)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=2.0), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def endpoints(self, model: str, refresh: bool = False) -> list[dict[str, Any]]:
        if refresh or not self.cache.fresh(model):
            try:
                resp = await self._http.get(f"{self.server}/v1/endpoints/{model}", params=_endpoint_params(self.location, self.residency), headers=self._auth)
                resp.raise_for_status()
                self.cache.store(model, resp.json())
            except httpx.HTTPError:
                if not self.cache.order(model):
                    self.cache.invalidate(model)
        return self.cache.order(model)

    async def infer(self, model: str, inputs: Mapping[str, Any] | Sequence[oip.Tensor]) -> InferResult:
        body, headers = self._body(inputs)
        attempts = 0
        for endpoint in await self.endpoints(model):
            attempts += 1
            try:
                resp = await self._http.post(endpoint["inferUrl"], content=body, headers=headers)
            except httpx.HTTPError:
                self.cache.eject(endpoint["url"])
                continue
            if resp.status_code >= 500:
                self.cache.eject(endpoint["url"])
                continue
            if resp.status_code >= 400:
                raise _refusal(resp)
            return InferResult(_decode(resp), endpoint["site"], endpoint["url"], attempts)
        self.cache.invalidate(model)
        attempts += 1
        try:
            resp = await self._http.post(f"{self.server}/v2/models/{model}/infer", content=body,
                                         headers={**headers, **self._auth, **_caller_headers(self.location, self.region, self.residency)})
        except httpx.HTTPError as exc:
            raise EdgeplaneError(f"neither a replica nor the gateway answered: {exc}") from exc
        if resp.status_code in (404, 503):
            raise NoEndpoint(_refusal(resp).args[0])
        if resp.status_code >= 400:
            raise _refusal(resp)
        return InferResult(_decode(resp), resp.headers.get("x-edgeplane-site", ""), self.server, attempts)
