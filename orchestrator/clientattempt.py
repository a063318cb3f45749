"""One attempt of a Python client's call, and what its answer is.

A call (:mod:`orchestrator.client`) is tried at replica after replica, then at the gateways:
each try is an :class:`Attempt` (where it goes, with which headers), and its answer reads
as a v2 inference's outputs (:func:`decode`), a gateway's refusal as the client raises it
(:func:`gateway_refusal`), or the :class:`InferResult` the caller gets. Every attempt of a
call carries its one ``X-Request-Id``, on its result and on any error it raises (:func:`named`). Values and pure
functions: which attempt comes next, and what to do with its answer, is the client's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx
import numpy as np

from edgeplane_proto import correlation, oip
from orchestrator import clientchat
from orchestrator.clienterrors import EdgeplaneError, NoEndpoint


@dataclass(frozen=True)
class InferResult:
    outputs: Mapping[str, np.ndarray]
    site: str
    url: str
    attempts: int
    request_id: str = ""  # the call's X-Request-Id, sent to every attempt

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def decode(resp: httpx.Response) -> Mapping[str, np.ndarray] | str:
    """The outputs of a v2 response, or why the body is not one (a proxy's page, another
    service at that URL)."""
    header = resp.headers.get(oip.BINARY_HEADER)
    try:
        decoded = oip.decode_response(resp.content, int(header) if header else None)
    except ValueError as exc:  # oip.ProtocolError, or a header that is not a number
        return f"HTTP {resp.status_code} ({resp.headers.get('content-type', 'no content type')}) with no v2 inference response: {exc}"
    return {t.name: t.array for t in decoded.outputs}


@contextlib.contextmanager
def named(headers: Mapping[str, str]) -> Iterator[None]:
    """Every client error raised within it is named by the call's id (``headers``' ``X-Request-Id``)."""
    try:
        yield
    except EdgeplaneError as exc:
        exc.request_id = headers[correlation.HEADER]
        raise


def gateway_refusal(resp: httpx.Response) -> EdgeplaneError:
    """A gateway's 4xx or 5xx answer: its 404 and 503 say no replica can answer (for now,
    with the 503's Retry-After), anything else is a refusal."""
    refusal = clientchat.read_refusal(resp)
    if resp.status_code in (404, 503):
        return NoEndpoint(refusal.args[0], retry_after=refusal.retry_after, reason=refusal.reason)
    return refusal


def replica_headers(headers: dict[str, str], auth: dict[str, str], entry: Mapping[str, object]) -> dict[str, str]:
    """The headers of a call to the replica of endpoint list ``entry``: the client's token
    (``auth``) only where the entry says the replica checks tokens (``auth: "token"``, an
    agent run with ``--serve-auth token``). A replica that checks none (``"none"``), or whose
    entry does not say (a control plane of an earlier release), is not sent it: it needs none,
    and the token, an admin's as much as an app's, would reach a box and a path that have no
    business holding it, often in plain HTTP (docs/security.md)."""
    return {**headers, **auth} if entry.get("auth") == "token" else headers


def refused_untokened(attempt: Attempt, resp: httpx.Response) -> bool:
    """Whether a replica was sent no token and answered 401 for one: it checks tokens though
    its entry did not say so (a control plane of an earlier release lists none); the request
    goes on to the next replica and the gateways, which take the token."""
    return resp.status_code == 401 and attempt.endpoint is not None and "authorization" not in attempt.headers


@functools.lru_cache(maxsize=1024)
def url(address: str) -> httpx.URL:
    """Parsed once per replica URL: httpx's parser takes half of building a request."""
    return httpx.URL(address)


@dataclass(frozen=True)
class Attempt:
    url: httpx.URL
    headers: dict[str, str]
    endpoint: str | None = None  # base URL of a replica; None for a gateway
    site: str | None = None
    gateway: str = ""  # base URL of the gateway (attempts through one)
    last: bool = True  # the last gateway: its answer is the caller's, whatever it is
