"""An answer's body as the Python client (:mod:`orchestrator.client`) reads it whole: no
larger than the client takes.

httpx reads a body to its end, whatever its size: a broken or hostile server (or a proxy
in front of one) that sends gigabytes, or a gzip body of a few KiB that inflates to them,
would have the client hold all of it. So each answer read whole (an inference's, an
endpoint list, a chat's refusal or whole answer) is sent for as a stream and read here,
counted as it inflates, and refused with :class:`~orchestrator.clienterrors.BadAnswer`
past the bound; its connection is then closed, and nothing more of it read. A stream's
events are not read whole: each of its lines is held to ``clientchat.MAX_LINE``.
"""

from __future__ import annotations

import httpx

from orchestrator.clienterrors import BadAnswer

#: The largest answer the client reads by default, in bytes: the gateway takes no larger
#: one from a replica (``orchestrator.gateway.upstream.UpstreamPool``'s ``max_body``), and
#: an agent no larger request (``--max-request-bytes``), so every answer the gateway passes
#: on fits; not imported from the gateway, which an application's client does not load.
MAX_ANSWER_BYTES = 64 << 20


def read(resp: httpx.Response, limit: int) -> httpx.Response:
    """``resp`` (sent with ``stream=True``) with its body read, at most ``limit`` bytes once
    inflated; :class:`BadAnswer` past that. The caller closes ``resp``."""
    if _length_known(resp, limit):
        resp.read()  # no more than its Content-Length is read
        return resp
    parts, size = [], 0
    for part in resp.iter_bytes():
        size += len(part)
        if size > limit:
            raise _too_large(resp, limit)
        parts.append(part)
    return _whole(resp, b"".join(parts))


async def aread(resp: httpx.Response, limit: int) -> httpx.Response:
    """:func:`read` for an asynchronous response."""
    if _length_known(resp, limit):
        await resp.aread()
        return resp
    parts, size = [], 0
    async for part in resp.aiter_bytes():
        size += len(part)
        if size > limit:
            raise _too_large(resp, limit)
        parts.append(part)
    return _whole(resp, b"".join(parts))


def _length_known(resp: httpx.Response, limit: int) -> bool:
    """Whether the body is as long as its Content-Length says, which is within ``limit``
    (``BadAnswer`` for one past it); False when only reading it tells (no length given, or a
    coding that inflates it)."""
    try:
        length = int(resp.headers.get("content-length", ""))
    except ValueError:
        return False
    if length > limit:
        raise _too_large(resp, limit)
    return resp.headers.get("content-encoding", "identity").strip().lower() == "identity"


def _whole(resp: httpx.Response, body: bytes) -> httpx.Response:
    """``resp`` with ``body``, its content as read: inflated already, so without the codings
    and framing of what came over the wire."""
    headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(resp.status_code, headers=headers, content=body, request=resp.request)


def _too_large(resp: httpx.Response, limit: int) -> BadAnswer:
    return BadAnswer(f"the answer of {resp.request.url} is larger than {limit} bytes, the most this client reads "
                     "(max_answer_bytes)")
