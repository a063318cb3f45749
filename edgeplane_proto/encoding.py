"""Request bodies sent with a ``Content-Encoding``: what the edge agent and the gateway
inflate before reading them, under the same limit as a plain body.

v2 clients compress requests (tritonclient's ``request_compression_algorithm``), and so may
any HTTP client on the OpenAI routes; "deflate" is the zlib format.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import NamedTuple

#: Content-Encoding -> zlib window bits
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: A compressed body up to this size is inflated on the event loop (a few milliseconds at
#: most, whatever its ratio); a larger one on a thread.
INFLATE_INLINE_MAX = 4096


class Refused(NamedTuple):
    """Why a compressed body cannot be read: the HTTP status, the message, and OpenAI's
    error ``code`` for the routes that speak it."""

    status: int
    message: str
    code: str


#: The ``Accept-Encoding`` a 415 carries, naming the codings a body may have (RFC 9110, 15.5.16)
ACCEPTED = "gzip, deflate"


def refusal_headers(status: int) -> dict[str, str]:
    """The headers of a refused compressed body's answer."""
    return {"accept-encoding": ACCEPTED} if status == 415 else {}


def is_identity(encoding: str | None) -> bool:
    """Whether a ``Content-Encoding`` header leaves the body as it is."""
    return encoding is None or encoding.strip().lower() in ("", "identity")


def inflate(body: bytes, encoding: str, limit: int) -> bytes | Refused:
    """The body a compressed request stands for, never more than ``limit`` bytes of it."""
    encoding = encoding.strip().lower()
    wbits = _WBITS.get(encoding)
    if wbits is None:
        return Refused(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or identity)",
                       "unsupported_content_encoding")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        return Refused(400, f"body is not valid {encoding}: {exc}", "invalid_content_encoding")
    if len(data) > limit:
        return Refused(413, f"request body exceeds {limit} bytes once inflated", "request_too_large")
    if not inflater.eof or inflater.unused_data:
        return Refused(400, f"body is not valid {encoding}: truncated or followed by other data", "invalid_content_encoding")
    return data


async def inflate_off_loop(body: bytes, encoding: str | None, limit: int) -> bytes | Refused:
    """:func:`inflate` for a server's event loop: a large body on a thread, since zlib lets
    go of the GIL (up to the limit inflated, ~0.3 s for 64 MiB) and the loop goes on
    answering others and heartbeating meanwhile. A body with no ``Content-Encoding``
    (``None``) or ``identity`` is returned as it is."""
    if is_identity(encoding):
        return body
    assert encoding is not None  # is_identity(None)
    if len(body) <= INFLATE_INLINE_MAX:
        return inflate(body, encoding, limit)
    return await asyncio.to_thread(inflate, body, encoding, limit)
