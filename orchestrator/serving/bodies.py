"""A Serve replica's request body, read under the edge agent's limit.

Serve hands a replica the request as it streams in, and ``Request.body()`` would take a body
of any size into memory: a replica's memory would grow with whatever a caller sends, and a
request an edge agent refuses with 413 would be answered by the other tier. So a body over
the limit is refused as the agent refuses it: from its ``Content-Length`` before a byte is
read, and a body sent without one once it is past the limit, the rest left unread.
"""

from __future__ import annotations

from starlette.requests import Request

from edgeplane_proto import encoding


def too_large(limit: int) -> encoding.Refused:
    """The agent's refusal of a body over ``limit`` bytes as sent."""
    return encoding.Refused(413, f"request body exceeds {limit} bytes", "request_too_large")


async def read(request: Request, limit: int) -> bytes | encoding.Refused:
    """The body as sent (still compressed, if it is), or the 413 when it is over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        return too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
