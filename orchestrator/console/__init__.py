"""The read-only web console at ``/ui``: fleet map, deployments, events and what-if.

Plain HTML and JavaScript modules shipped as package data (no build step, nothing fetched
from the internet): the base map is Natural Earth's 1:110m country borders, vendored in
``static/vendor`` (see its LICENSES.md). The page reads the same ``/v1`` API as the CLI with
the same bearer token, kept in the browser tab's sessionStorage; the files themselves hold
no data and are served without a token.

Every response under ``/ui`` carries the headers of a page that takes a bearer token: no
framing by another site (clickjacking the sign-in form), scripts, styles, images and
requests from this origin only, no MIME sniffing, and no Referer leaving the page.

The page's files are sent with ``Cache-Control: no-cache``: a browser keeps them but asks
whether they changed (their ETag) before each use. Without it a browser may reuse a file it
holds for as long as its own heuristic says, and after an upgrade run the old app.js with
the new index.html or api.js.
"""

from __future__ import annotations

import pathlib

import pycountry
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = pathlib.Path(__file__).parent / "static"

# The page loads nothing from elsewhere (the base map and topojson-client are vendored) and
# has no inline script or style, so 'self' is all it needs.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; object-src 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


#: what the page's own files are sent with besides SECURITY_HEADERS
FILE_HEADERS = {**SECURITY_HEADERS, "cache-control": "no-cache"}


class _Hardened:
    """An ASGI app whose every HTTP response also carries ``headers`` (those it does not set itself)."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in self.headers.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _iso_codes() -> dict[str, str]:
    """ISO 3166 numeric code (the map's country ids) → alpha-2 (residency in manifests)."""
    return {c.numeric: c.alpha_2 for c in pycountry.countries}


def routes() -> list[BaseRoute]:
    codes = _iso_codes()

    async def to_index(request: object) -> Response:
        return RedirectResponse("/ui/", status_code=307, headers=SECURITY_HEADERS)

    async def iso(request: object) -> Response:
        return JSONResponse(codes, headers={"cache-control": "max-age=86400", **SECURITY_HEADERS})

    return [
        Route("/ui", to_index, methods=["GET"]),
        Route("/ui/iso-countries.json", iso, methods=["GET"]),
        Mount("/ui", app=_Hardened(StaticFiles(directory=STATIC, html=True), FILE_HEADERS), name="console"),
    ]
