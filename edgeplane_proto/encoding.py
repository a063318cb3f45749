"""Request bodies sent with a ``Content-Encoding``: what the edge agent and the gateway
inflate before reading them, under the same limit as a plain body.

v2 clients compress requests (tritonclient's ``request_compression_algorithm``), and so may
any HTTP client on the OpenAI routes; "deflate" is the zlib format.

A few KB of gzip inflate to many MB, so a server that bounds the memory its requests hold
(the edge agent) cannot charge a compressed body by its length, nor once it is inflated,
when the memory is already taken: :func:`inflate_off_loop` takes a :class:`Meter` and
inflates piece by piece, each piece charged before it is made, and stops at the first
refusal.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import NamedTuple, Protocol, TypeVar

#: Content-Encoding -> zlib window bits
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: A compressed body up to this size is inflated on the event loop (a few milliseconds at
#: most, whatever its ratio); a larger one on a thread.
INFLATE_INLINE_MAX = 4096
#: A metered body is inflated in pieces of at most this many bytes, the first of
#: :data:`FIRST_PIECE_BYTES`, each twice as large as the one before: a small body is
#: charged little more than it takes.
PIECE_BYTES = 1 << 20
FIRST_PIECE_BYTES = 64 * 1024

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Meter(Protocol[R_co]):
    """What inflating a body is charged to (the edge agent's memory budget of requests in
    flight). Called on the event loop."""

    def charge(self, n: int) -> R_co | None:
        """Hold ``n`` bytes more, or why not (the inflation stops, and returns it)."""
        ...

    def give_back(self, n: int) -> None:
        """Let go of ``n`` of the bytes charged: a piece came out smaller than charged."""
        ...


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


async def inflate_off_loop(body: bytes, encoding: str | None, limit: int,
                           meter: Meter[R] | None = None) -> bytes | Refused | R:
    """:func:`inflate` for a server's event loop: a large body on a thread, since zlib lets
    go of the GIL (up to the limit inflated, ~0.3 s for 64 MiB) and the loop goes on
    answering others and heartbeating meanwhile. A body with no ``Content-Encoding``
    (``None``) or ``identity`` is returned as it is.

    With a ``meter``, each piece is charged before it is made (twice its most: zlib's
    buffers and the piece), what it did not take given back once made, and the pieces'
    join charged once more while it is made; the first refusal ends the inflation and is
    returned, with what was charged still held (to be given back with the request's
    other charges)."""
    if is_identity(encoding):
        return body
    assert encoding is not None  # is_identity(None)
    if meter is not None:
        return await _inflate_metered(body, encoding, limit, meter)
    if len(body) <= INFLATE_INLINE_MAX:
        return inflate(body, encoding, limit)
    return await asyncio.to_thread(inflate, body, encoding, limit)


async def _inflate_metered(body: bytes, encoding: str, limit: int, meter: Meter[R]) -> bytes | Refused | R:
    encoding = encoding.strip().lower()
    wbits = _WBITS.get(encoding)
    if wbits is None:
        return inflate(body, encoding, limit)  # the 415
    inflater = zlib.decompressobj(wbits)
    on_thread = len(body) > INFLATE_INLINE_MAX
    pieces: list[bytes] = []
    made = 0
    rest = body
    piece_max = FIRST_PIECE_BYTES
    while True:
        most = min(piece_max, limit + 1 - made)
        refused = meter.charge(2 * most)
        if refused is not None:
            return refused
        try:
            piece = await asyncio.to_thread(inflater.decompress, rest, most) if on_thread else inflater.decompress(rest, most)
        except zlib.error as exc:
            return Refused(400, f"body is not valid {encoding}: {exc}", "invalid_content_encoding")
        got = len(piece)
        meter.give_back(2 * most - got)
        made += got
        if made > limit:
            return Refused(413, f"request body exceeds {limit} bytes once inflated", "request_too_large")
        if got:
            pieces.append(piece)
        del piece
        if inflater.eof:
            break
        if not inflater.unconsumed_tail and got < most:  # all of it read, and the stream stops short
            return Refused(400, f"body is not valid {encoding}: truncated or followed by other data", "invalid_content_encoding")
        rest = inflater.unconsumed_tail
        piece_max = min(PIECE_BYTES, 2 * piece_max)
    if inflater.unused_data:
        return Refused(400, f"body is not valid {encoding}: truncated or followed by other data", "invalid_content_encoding")
    if len(pieces) <= 1:
        return pieces[0] if pieces else b""
    refused = meter.charge(made)  # the join, beside its pieces until it is made
    if refused is not None:
        return refused
    whole = b"".join(pieces)
    pieces.clear()
    meter.give_back(made)
    return whole
