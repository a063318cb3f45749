"""``GET /v1/artifacts/<sha256>``: the control plane serving its local artifacts to agents and
data-centre replicas.

Only bytes whose sha256 was checked go out under it. The catalog opens the file without
following a link and hands it over only while it is still the file it hashed, and the
response is read from that open file: a file rewritten, deleted or swapped for a link after
its check is refused (409, the next reconcile pass says why on the Model), never served
under a digest it does not have. Serving reads no more than it sends, in worker threads, so
a multi-GB artifact never holds the event loop.

Agents resume an interrupted download with ``Range: bytes=N-``: one range is honoured, any
other request gets the whole file, as HTTP allows.

No token is asked, with ``--auth token`` too: a data centre's Ray Serve replicas download
here and hold none. Only a digest the caller already knows, of an artifact still in use, is
served, and nothing lists them (docs/security.md, "Not enforced yet", says who knows one and
how to keep confidential weights off reach).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from typing import BinaryIO

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from orchestrator.api import problems
from orchestrator.artifacts import catalog as catalog_mod

#: ASCII digits, at most 19 (a file's offsets fit in them; more is a range not understood, not an int() to parse)
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


def route(catalog: catalog_mod.ArtifactCatalog) -> Route:
    async def artifact(request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        try:
            opened = await asyncio.to_thread(catalog.open_checked, sha256)  # an artifact root may be on NFS
        except catalog_mod.ArtifactChanged as exc:
            return problems.answer(409, str(exc))
        if opened is None:
            return problems.answer(404, "no such artifact")
        fh, identity = opened
        return _file_response(fh, identity.size, sha256, request)

    return Route("/v1/artifacts/{sha256}", artifact, methods=["GET", "HEAD"])


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` bytes one ``Range`` header asks for; None to send the
    whole file (no header, several ranges, or one not understood); ``(size, size)`` when it
    cannot be satisfied."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(0) == "bytes=-":
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        return (size, size) if int(last) == 0 or size == 0 else (max(0, size - int(last)), size - 1)
    if last and int(last) < int(first):
        return None
    if int(first) >= size:
        return size, size
    return int(first), min(int(last), size - 1) if last else size - 1


def _file_response(fh: BinaryIO, size: int, sha256: str, request: Request) -> Response:
    headers = {"accept-ranges": "bytes", "etag": f'"{sha256}"', "content-type": "application/octet-stream"}
    wanted = byte_range(request.headers.get("range"), size)
    if wanted == (size, size):
        fh.close()
        return problems.answer(416, f"the range {request.headers.get('range')!r} asks for none of the artifact's {size} bytes",
                               headers={"accept-ranges": "bytes", "etag": headers["etag"], "content-range": f"bytes */{size}"})
    first, last = wanted or (0, size - 1)
    status = 200 if wanted is None else 206
    if wanted is not None:
        headers["content-range"] = f"bytes {first}-{last}/{size}"
    headers["content-length"] = str(last - first + 1)
    if request.method == "HEAD":
        fh.close()
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_read(fh, first, last + 1), status_code=status, headers=headers)


async def _read(fh: BinaryIO, start: int, stop: int) -> AsyncIterator[bytes]:
    try:
        offset = start
        while offset < stop:
            chunk = await asyncio.to_thread(os.pread, fh.fileno(), min(catalog_mod.CHUNK, stop - offset), offset)
            if not chunk:  # truncated since it was opened: fewer bytes than announced, the download fails
                raise OSError(f"artifact file shrank while it was served ({offset} of {stop} bytes)")
            offset += len(chunk)
            yield chunk
    finally:
        fh.close()
